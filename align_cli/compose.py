"""Composing a command line as `align` does, with one-line errors: Hydra's compose API, every
`${...}` resolved, repeated keys refused, quoting hints, and the probe compositions of a sweep.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .errors import AlignError, hydra_message, one_line


def compose_checked(
    overrides: list[str], return_hydra_config: bool = False, config_name: str = "config"
) -> DictConfig:
    """Composes conf/config.yaml as `align` does; a composition problem is a one-line AlignError.

    Args:
        overrides: command-line overrides, already normalized (`method.args.k` -> `++...`).
        return_hydra_config: keep the `hydra` node (to read the run folder).
        config_name: the root config in conf/ (`pipeline` for `align pipeline`, `eval` for `align eval`).

    Raises:
        AlignError: an override that does not parse, an unknown group option (with the valid
            ones), an unknown key (with the nearest), a value of the wrong type, a method setting
            its settings class refuses (`config.method_settings`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    schema.register()
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception as err:
            reason = one_line(str(err))
            raise AlignError(
                f"cannot parse '{_shown(override)}': {reason}{_quoting_hint(override, reason, parser)} "
                "(see https://hydra.cc/docs/advanced/override_grammar/basic/)"
            ) from err
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3", job_name="align"):
            cfg = compose(
                config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config
            )
    except Exception as err:
        # Show overrides as typed: `method.args.k=v`, not the `++` form normalize_overrides made.
        message = hydra_message(err, _culprit(err, overrides)).replace("++method.args.", "method.args.")
        raise AlignError(message) from err
    finally:
        GlobalHydra.instance().clear()
    check_interpolations(cfg)
    if cfg.get("method") is not None and "name" in cfg.method:
        # What Hydra cannot check: a key added with `+`, a value outside the valid ones.
        schema.method_settings(cfg.method)
    return cfg


def check_interpolations(cfg: DictConfig) -> None:
    """Resolves every `${...}` of the config (Hydra's own node aside) once, up front.

    OmegaConf resolves lazily: `${nosuch.key}` or `${oc.env:UNSET}` would otherwise fail
    wherever the value is first read, as a traceback.

    Raises:
        AlignError: naming the key, its unresolved value and why it does not resolve.
    """
    from omegaconf.errors import OmegaConfBaseException

    for key in cfg:
        if key == "hydra":
            continue
        try:
            value = cfg[key]  # reading a scalar (or an interpolated group) resolves it
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            full_key = getattr(err, "full_key", None) or str(key)
            reason = one_line(getattr(err, "msg", "") or str(err))
            raw = _raw(cfg, full_key)
            raise AlignError(
                f"{full_key}={raw} cannot be resolved: {reason} (set the key it names, the environment "
                "variable, or give a value without ${...})"
            ) from None


def _raw(cfg: DictConfig, full_key: str) -> str:
    """The value of `full_key` as written (its `${...}` text), or "?" when it cannot be read."""
    try:
        node = OmegaConf.to_container(cfg, resolve=False)  # interpolations stay as written
        for part in full_key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return str(node)
    except Exception:
        return "?"


def _shown(override: str) -> str:
    """An override as the user typed it: without the `++` that `normalize_overrides` adds."""
    if override.startswith("++") and override[2:].startswith(schema.OPEN_PREFIXES):
        return override[2:]
    return override


def _quoting_hint(override: str, reason: str, parser) -> str:
    """How to quote a value that holds characters Hydra's grammar takes only inside quotes (any
    non-ASCII letter, as in `data.system=你是助手`), or "" when quoting would not help."""
    import shlex

    from .compat import is_unquoted_character_error

    key, eq, value = _shown(override).partition("=")
    if not eq or not value or not is_unquoted_character_error(reason) or value[0] in "'\"":
        return ""
    if '"' not in value:
        quoted = f'"{value}"'
    elif "'" not in value:
        quoted = f"'{value}'"
    else:
        quoted = '"' + value.replace('"', '\\"') + '"'
    try:
        parser.parse_override(f"{key}={quoted}")
    except Exception:
        return ""  # the key is the problem, or more than quoting
    return (
        f"; a value with characters outside Hydra's unquoted set (non-ASCII letters among them) must be "
        f"quoted, and the shell must pass the quotes on: {shlex.quote(f'{key}={quoted}')}"
    )


def _key(override) -> str:
    """What a parsed override sets: its key or group, with its package (`group@pkg`)."""
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def check_repeated_keys(overrides: list[str]) -> None:
    """Refuses a key given twice on one command line (`method=dpo method=kto`, `+a=1 a=2`, `~a a=1`).

    Hydra would apply both in order, so the last silently wins; a sweep is one override
    (`method=dpo,kto` with -m). Overrides that do not parse are left to the caller.

    Raises:
        AlignError: naming the key and both overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    seen: dict[str, tuple[str, object]] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:
            continue
        key = _key(override)
        if key not in seen:
            seen[key] = (text, override)
            continue
        first, earlier = seen[key]
        hint = "keep one"
        if override.type.name == earlier.type.name == "CHANGE" and not (
            override.is_sweep_override() or earlier.is_sweep_override()
        ):
            name, _, value = _shown(first).partition("=")
            other = text.partition("=")[2]
            hint += f" (to run each, sweep with -m {name}={value},{other})" if value != other else ""
        raise AlignError(
            f"{key} is given twice on the command line ({_shown(first)}, then {_shown(text)}): {hint}"
        )


def _culprit(err: BaseException, overrides: list[str]) -> str | None:
    """The override an error is about, when its message or its key names one."""
    key = getattr(err.__cause__, "full_key", None)
    for override in overrides:
        name = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        if override in str(err) or (key and name == key):
            return override
    return None


_PREFIX = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}


def probe_sets(overrides: list[str], multirun: bool, limit: int = 40) -> list[list[str]]:
    """The override lists to compose before Hydra runs.

    A sweep (`a=1,2`) composes once per value, the other sweeps at their first value, so a
    wrong option anywhere in the sweep fails before the first job starts.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [overrides]
    parser = OverridesParser.create()
    choices: list[list[str]] = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
            if not override.is_sweep_override():
                choices.append([text])
                continue
            key = _key(override)
            prefix = _PREFIX.get(override.type.name, "")
            interval = override.value()
            if type(interval).__name__ == "IntervalSweep":  # Optuna's interval(a,b): probe both ends
                ends = [interval.start, interval.end]
                values = [f"{prefix}{key}={v!r}" for v in ends]
            else:
                values = [f"{prefix}{key}={v}" for v in override.sweep_string_iterator()]
            for value in values:
                parser.parse_override(value)  # a value that needs quoting: let Hydra expand it
            choices.append(values or [text])
        except Exception:
            choices.append([text])
    probes = [[c[0] for c in choices]]
    for i, values in enumerate(choices):
        for value in values[1:]:
            probes.append([*probes[0][:i], value, *probes[0][i + 1 :]])
    return probes[:limit]


def quote_value(value: str) -> str:
    """A path as a Hydra override value (quoted when it holds characters the grammar reserves)."""
    if all(c.isalnum() or c in "/._-~" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
