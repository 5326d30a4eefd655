"""The one exception type for user mistakes.

`align` prints `str(error)` as a single line and exits 1, with no traceback unless
`debug=true`. Everything a user can get wrong (a path, a key, a column, a value) raises this,
with a message that names the file and line, the key or the path, and what would be valid.
"""

from __future__ import annotations

import difflib


class AlignError(Exception):
    """A user-facing error: its message is all the user sees."""


def nearest(word: str, candidates, n: int = 3) -> str:
    """Formats the closest valid names to `word` for an error message ("" when none is close)."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
