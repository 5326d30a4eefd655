"""The exception types for user mistakes and stopped runs, and one-line versions of Hydra's errors.

`align` prints `str(error)` as a single line (`align: error: ...`) and exits with
`error.exit_code` (1 unless said otherwise), with no traceback unless `debug=true`. Everything
a user can get wrong (a path, a key, a column, a value) raises `AlignError`, with a message that
names the file and line, the key or the path, and what would be valid.
"""

from __future__ import annotations

import difflib
import sys

# Exit codes of `align` (also in the README): 0 done, 1 a user error or a diverged run, 2 an
# unknown command, 128 + the signal number when a run was interrupted after saving a checkpoint.
EXIT_ERROR = 1
EXIT_USAGE = 2


class AlignError(Exception):
    """A user-facing error: its message is all the user sees."""

    exit_code = EXIT_ERROR


class DataError(AlignError):
    """Problems found in a dataset: all of them (up to a cap) are kept for `align data validate`.

    `str()` is the first problem and how many more there are, so `align train` still prints
    one line.
    """

    def __init__(self, problems: list[str], total: int | None = None, source: str = ""):
        self.problems = list(problems)
        self.total = total if total is not None else len(problems)
        self.source = source
        more = self.total - 1
        message = self.problems[0] if self.problems else f"{source}: invalid data"
        if more > 0:
            message += (
                f" (and {more} more problem{'s' if more > 1 else ''}"
                f"{' in ' + source if source else ''}: `align data validate` lists them)"
            )
        super().__init__(message)


class TrainingInterrupted(AlignError):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; exits 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def nearest(word: str, candidates, n: int = 3) -> str:
    """Formats the closest valid names to `word` for an error message ("" when none is close)."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def one_line(text: str) -> str:
    """The first non-empty line of a message, stripped."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


# Hints for a group option that does not exist: most often the user meant a path.
_GROUP_HINTS = {
    "model": "; or point model.name_or_path at a hub id or a local folder",
    "data": "; or point data.path at a file, a folder or a hub dataset",
    "hydra/sweeper": " (optuna comes with pip install 'align-cli[sweep]')",
    "hydra/launcher": " (submitit_local and submitit_slurm come with pip install 'align-cli[cluster]')",
}


def hydra_message(err: BaseException, override: str | None = None) -> str:
    """Reduces a Hydra or OmegaConf composition error (often 10+ lines) to one line.

    Args:
        err: what Hydra's compose raised (ConfigCompositionException, MissingConfigException,
            OverrideParseException, or an OmegaConf error).
        override: the command-line override that caused it, when the caller knows.
    """
    from hydra.errors import MissingConfigException

    from . import compat

    message = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = list(err.options or [])
        if group == "method":
            return f"unknown method '{option}': choose one of {', '.join(options)}"
        return (
            f"unknown {group} option '{option}'{nearest(option, options)}: choose one of "
            f"{', '.join(options)}{_GROUP_HINTS.get(group, '')}"
        )
    if compat.is_ambiguous_value(message):
        return (
            f"{one_line(message)}: add -m to run one job per value, write [a,b] for a list, "
            "or quote it for a string"
        )
    options = compat.missing_choice(message, "method")
    if options is not None:
        return f"no method chosen: add method=<{'|'.join(options)}>"

    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if cause is not None and full_key:
        key = str(getattr(cause, "key", full_key.rsplit(".", 1)[-1]))
        parent = full_key.rpartition(".")[0]
        if compat.is_unknown_key(cause):
            node = getattr(cause, "parent_node", None)
            keys = [str(k) for k in node.keys() if k != "hydra"] if node is not None else []
            name = node.get("name", "") if parent == "method" and node is not None else ""
            return unknown_key(full_key, key, keys, name)
        reason = one_line(getattr(cause, "msg", "") or str(cause))
        return f"{override or full_key}: {reason}{_valid_values(cause, key)}"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    reason = one_line(message)
    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        reason = f"cannot compose the config: {type(err).__name__}: {reason}"
    if cause is not None and (compat.is_merge_error(reason) or not reason):
        reason = f"{reason}: {one_line(str(cause))}" if reason else one_line(str(cause))
    if override and override not in reason:
        reason = f"{override}: {reason}"
    if not reason:
        reason = type(err).__name__
    return reason


# Method keys that were renamed: the old name's error names the new one (issue 11: "format"
# meant both the dataset type a method trains on and `data.format`, the input layout).
RENAMED_METHOD_KEYS = {"format": "dataset_type"}


def unknown_key(full_key: str, key: str, keys: list[str], method: str = "") -> str:
    """The one-line message for a key that is not in the config: where it is not valid, the
    nearest valid keys, every valid key. Hydra's errors (`method.mdoe=x`) and the method
    settings' own check (`+method.mdoe=x`, see config.method_settings) both use it.

    Args:
        full_key: the dotted key as given (`method.mdoe`).
        key: its last part.
        keys: the valid keys beside it.
        method: the method's name, when the key is one of `method`'s own.
    """
    parent = full_key.rpartition(".")[0]
    where = f"a {parent} option" if parent else "an align option"
    hint = nearest(key, keys)
    if parent == "method":
        where = f"a key of method={method} (trainer settings go under method.args.<key>)"
        if key in RENAMED_METHOD_KEYS:
            new = RENAMED_METHOD_KEYS[key]
            hint = f" (did you mean: {new}? method.{key} is now method.{new}; data.{key} is the input layout)"
    valid = f"; valid keys: {', '.join(keys)}" if keys else ""
    if parent and not keys:
        valid = f"; add it with +{full_key}=<value>"
    return f"{full_key}: '{key}' is not {where}{hint}{valid}"


def _valid_values(cause: BaseException, key: str) -> str:
    """ "; use true or false" when the refused value was for a bool key of a schema, else ""."""
    import typing

    from omegaconf import OmegaConf

    node = getattr(cause, "parent_node", None)
    try:
        hint = typing.get_type_hints(OmegaConf.get_type(node)).get(key) if node is not None else None
    except Exception:  # not a dataclass node, or annotations that do not evaluate
        return ""
    return "; use true or false" if hint is bool else ""


def fail(err: BaseException | str, code: int | None = None) -> None:
    """Prints `align: error: <one line>` on stderr and exits (`align: <line>` for an interrupt)."""
    message = " ".join(str(err).split("\n")).strip() or type(err).__name__
    prefix = "align:" if isinstance(err, TrainingInterrupted) else "align: error:"
    print(f"{prefix} {message}", file=sys.stderr, flush=True)
    sys.exit(code if code is not None else getattr(err, "exit_code", 1))


def wants_debug(argv: list[str]) -> bool:
    """Whether the command line turns on `debug` (tracebacks instead of one-line errors)."""
    return any(a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)
