"""`key=value` options of the commands that take a model rather than a training config
(`align chat`, `align generate`, `align export`).

They read like Hydra overrides (`temperature=0`, `model.dtype=bfloat16`, `data.columns.prompt=q`)
and are checked the same way: OmegaConf parses each value and a dataclass types it, so an
unknown key is one line naming the nearest valid key, and a wrong type is one line too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import AlignError, nearest

T = TypeVar("T")

# Sub-dicts whose keys are the user's own (data.columns.<ours>=<yours>).
_OPEN = ("data.columns",)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _valid_keys(type(default), f"{name}.")
        else:
            keys.append(name)
    return keys


def parse(cls: type[T], overrides: list[str], command: str, unused: dict[str, str] | None = None) -> T:
    """Builds `cls` (a dataclass, possibly with dataclass groups) from `key=value` strings.

    Args:
        cls: the command's options dataclass.
        overrides: the command line's `key=value` arguments.
        command: e.g. "align chat", for messages.
        unused: keys of a shared group this command does not read -> why (a one-line error if set).

    Raises:
        AlignError: an argument without `=`, an unknown key (with the nearest valid ones), a
            value of the wrong type, or one the dataclass rejects.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    unused = unused or {}
    valid = [k for k in _valid_keys(cls) if k not in unused]
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            raise AlignError(f"{command}: '{item}' is not key=value; valid keys: {', '.join(valid)}")
        if key in unused:
            raise AlignError(f"{command}: {key} {unused[key]}")
        if key not in valid and not any(key.startswith(f"{o}.") for o in _OPEN):
            raise AlignError(
                f"{command}: '{key}' is not an option{nearest(key, valid)}; valid keys: {', '.join(valid)}"
            )
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(getattr(err, "msg", "") or err).strip().splitlines()[0]
        raise AlignError(f"{command}: {key + ': ' if key else ''}{reason}") from None


def split_args(argv: list[str], positional: int, usage: str) -> tuple[list[str], list[str]]:
    """The first `positional` arguments (paths) and the `key=value` rest.

    Raises:
        AlignError: fewer positional arguments than needed (with the usage line).
    """
    names = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(names) < positional:
        raise AlignError(f"missing argument: {usage}")
    if len(names) > positional:
        raise AlignError(f"unexpected argument '{names[positional]}': {usage} (options are key=value)")
    return names, [a for a in argv if a not in names and a not in ("-q", "--quiet")]


def quiet_flag(argv: list[str]) -> bool:
    return any(a in ("-q", "--quiet") for a in argv)


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
