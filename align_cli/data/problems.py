"""Collecting every problem in a dataset instead of stopping at the first.

`align data validate` shows them all (up to a cap); `align train` stops on them with one line
naming the first and how many more there are. A problem is one string that starts with where
it is (`file:line: ...`), so the user can jump to it.
"""

from __future__ import annotations

from ..errors import DataError

MAX_LISTED = 50  # enough to see the pattern; the total is always counted


class Problems:
    """Problems found so far, in the order they were found."""

    def __init__(self, limit: int = MAX_LISTED):
        self.limit = limit
        self.items: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append(message)

    def __bool__(self) -> bool:
        return self.total > 0

    def __len__(self) -> int:
        return self.total

    def error(self, source: str = "") -> DataError:
        return DataError(self.items, self.total, source)

    def raise_if_any(self, source: str = "") -> None:
        """Raises a DataError naming the first problem and the count, if there is any."""
        if self.total:
            raise self.error(source)


class RowError(ValueError):
    """A problem with one row; the caller adds the row's origin (file:line)."""
