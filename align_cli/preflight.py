"""Before Hydra starts: compose the command line once, and pick the run folder.

`prepare(argv)` composes `conf/config.yaml` with the user's overrides through Hydra's compose
API (every value of a sweep too), so a wrong group option, key or value is one line
(`align: error: ...`) rather than Hydra's report, and before any job starts. It then picks a
run folder that no other run uses (one per `torchrun` launch, shared by its ranks), refuses a
folder that holds a finished run, and warns when a resumed run's settings changed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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
            ones), an unknown key (with the nearest), a value of the wrong type.
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


def _probe_sets(overrides: list[str], multirun: bool, limit: int = 40) -> list[list[str]]:
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


def _quote(value: str) -> str:
    """A path as a Hydra override value (quoted when it holds characters the grammar reserves)."""
    if all(c.isalnum() or c in "/._-~" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unique_dir(path: str) -> str:
    """Creates and returns `path`, or `path_1`, `path_2`... if another run took it first.

    mkdir is atomic, so two runs started in the same second (the default folder name has a
    one-second resolution) never share a folder.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"


def shared_unique_dir(path: str) -> str:
    """`unique_dir(path)`, decided once for all the ranks of one `torchrun` launch on this node.

    Every rank runs `align train` and would otherwise take a folder of its own. The ranks of one
    launch share a parent (torchrun's agent) and, through `${run_stamp:}`, the same `path`: local
    rank 0 picks the folder and leaves its name in a file keyed by both; the others read it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return unique_dir(path)
    import hashlib
    import tempfile

    launch = f"{os.getppid()}-{os.environ.get('MASTER_PORT', '')}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    key = hashlib.sha1(f"{launch}-{os.path.abspath(path)}".encode()).hexdigest()[:16]
    note = Path(tempfile.gettempdir()) / f"align-run-dir-{key}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        chosen = unique_dir(path)
        partial = note.with_suffix(f".{os.getpid()}")
        partial.write_text(chosen, encoding="utf-8")
        os.replace(partial, note)  # atomic: a reader sees the whole name or nothing
        return chosen
    for _ in range(1200):
        if note.exists():
            return note.read_text(encoding="utf-8").strip()
        time.sleep(0.05)
    raise AlignError("waited 60 s for local rank 0 to pick the run folder; set hydra.run.dir=<folder>")


def _refuse_finished(folder: str, how: str) -> None:
    if os.path.exists(os.path.join(folder, "summary.json")):
        raise AlignError(
            f"{how}={folder} holds a finished run; choose another folder (to train it further, "
            f"start from it with model.name_or_path={folder})"
        )


def _differences(old, new, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _resolved(cfg: DictConfig, ignore: set[str]) -> dict:
    """The config as plain values, interpolations resolved (a message shows `pointwise`, not
    `${oc.select:...}`); a key that does not resolve (a saved config's lost environment
    variable) keeps its text."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    out = {}
    for key in cfg:
        if key in ignore:
            continue
        try:
            value = cfg[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:
            out[key] = raw[key] if isinstance(raw[key], (dict, list)) else str(raw[key])
    return out


_FIXED_ON_RESUME = ("method.", "model.name_or_path", "model.revision", "peft.", "quant.", "data.")


def _check_changed_config(run_dir: str, cfg: DictConfig) -> None:
    """Refuses to resume a run with another method, model, adapter setup or data; warns when
    other settings differ from those it was started with.

    Raises:
        AlignError: the saved config differs in a setting that would change what the checkpoint means.
    """
    saved = os.path.join(run_dir, ".hydra", "config.yaml")
    if not run_dir or not os.path.exists(saved):
        return
    ignore = {"resume", "output_dir", "debug", "plot", "hydra"}
    schema.register()  # the saved config may use our resolvers (`${samples:...}`)
    old, new = _resolved(OmegaConf.load(saved), ignore), _resolved(cfg, ignore)
    changed = _differences(old, new)
    # What would make the checkpoint mean something else: another method, model, adapter
    # setup or data. Trainer settings (method.args) may change, with a warning.
    fatal = [c for c in changed if c.startswith(_FIXED_ON_RESUME) and not c.startswith("method.args.")]
    if fatal:
        raise AlignError(
            f"resume: {run_dir} was trained with other settings ({'; '.join(fatal[:4])}): resume it with its "
            f"own (see {os.path.join(run_dir, '.hydra', 'overrides.yaml')}), or start a new run from a "
            "checkpoint with model.name_or_path=<checkpoint folder>"
        )
    if changed:
        print(
            f"align: warning: resuming with settings that differ from the run's: {'; '.join(changed[:8])}",
            file=sys.stderr,
            flush=True,
        )


def _optuna_settings(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Makes Optuna optimise `sweep.metric` in `sweep.direction`; checks its storage can work.

    Returns overrides to add (`hydra.sweeper.direction=...` when the command line sets none).

    Raises:
        AlignError: a direction that contradicts sweep.direction, or an SQL storage with an
            SQLAlchemy that optuna 2.x cannot use.
    """
    from .sweep import default_metric

    metric, direction = default_metric(cfg.sweep.metric, cfg.sweep.direction)
    given = [o for o in overrides if o.startswith("hydra.sweeper.direction=")]
    extra = []
    if not given:
        extra.append(f"hydra.sweeper.direction={direction}")
    elif given[0].split("=", 1)[1] != direction and cfg.sweep.direction != "auto":
        raise AlignError(
            f"{given[0]} contradicts sweep.direction={cfg.sweep.direction}: give one of them "
            f"(sweep.direction alone also sets Optuna's)"
        )
    storage = cfg.hydra.sweeper.get("storage")
    if storage and str(storage).startswith(("sqlite", "postgresql", "mysql")):
        from importlib.metadata import PackageNotFoundError, version

        try:
            sqlalchemy = version("sqlalchemy")
        except PackageNotFoundError:
            sqlalchemy = "0"
        if int(sqlalchemy.split(".")[0]) >= 2:
            raise AlignError(
                f"hydra.sweeper.storage={storage}: optuna 2.x (what hydra-optuna-sweeper 1.3 allows) fails "
                f"with SQLAlchemy {sqlalchemy}; install the sweep extra, which pins it: "
                "pip install 'align-cli[sweep]' (or pip install 'sqlalchemy<2'), or drop the storage "
                "for an in-memory study"
            )
    log_metric = f"align: optuna: {direction} {metric}"
    print(log_metric, file=sys.stderr, flush=True)
    return extra


def prepare(argv: list[str]) -> list[str]:
    """Checks the command line and picks the run folder before Hydra starts.

    Returns the argv to hand to Hydra: its flags first, then the overrides, plus
    `hydra.run.dir=` (or `hydra.sweep.dir=`) naming a folder no other run uses.

    Raises:
        AlignError: a composition problem (one line), or a run folder holding a finished run.
    """
    from .compat import hydra_args_parser

    args = hydra_args_parser().parse_intermixed_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun:
        return argv
    if args.multirun and args.cfg:
        raise AlignError(
            f"--cfg {args.cfg} prints one config: drop -m (a sweep value's config: give that value)"
        )
    overrides = list(args.overrides)
    rest = list(argv)
    for override in overrides:  # what is left are Hydra's flags, in their order
        rest.remove(override)
    check_repeated_keys(overrides)  # before sweeps expand: the message shows them as typed
    probes = _probe_sets(overrides, args.multirun)
    cfg = compose_checked(probes[0], return_hydra_config=True)
    for probe in probes[1:]:
        compose_checked(probe)
    if args.cfg or args.config_name or args.config_path or args.config_dir:
        return [*rest, *overrides]  # printing the config, or another config tree: nothing to run

    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    output_dir = cfg.get("output_dir")
    extra = []
    if args.multirun and "optuna" in str(cfg.hydra.sweeper.get("_target_", "")).lower():
        extra += _optuna_settings(cfg, overrides)
    if args.multirun:
        if output_dir:
            raise AlignError(
                "output_dir with -m: every job would write the same folder; leave it out "
                "(each job gets its own folder under hydra.sweep.dir)"
            )
        sweep_dir = str(cfg.hydra.sweep.dir)
        if "hydra.sweep.dir" in keys:
            for summary in Path(sweep_dir).glob("*/summary.json"):
                _refuse_finished(str(summary.parent), "hydra.sweep.dir")
        else:
            extra.append(f"hydra.sweep.dir={_quote(unique_dir(sweep_dir))}")
        return [*rest, *overrides, *extra]

    resuming = cfg.get("resume") not in (None, False, "false")
    if output_dir:
        run_dir = str(output_dir)
        _refuse_finished(run_dir, "output_dir")
        if "hydra.run.dir" in keys:
            _refuse_finished(str(cfg.hydra.run.dir), "hydra.run.dir")
        else:
            # One run, one folder: the config Hydra saves goes beside the model it describes.
            extra.append(f"hydra.run.dir={_quote(run_dir)}")
    elif "hydra.run.dir" in keys:
        run_dir = str(cfg.hydra.run.dir)
        _refuse_finished(run_dir, "hydra.run.dir")
    elif resuming and cfg.get("resume") is True:
        raise AlignError(
            "resume=true continues a run: name its folder with hydra.run.dir=<run folder> "
            "(or output_dir=<run folder>), or pass resume=<checkpoint folder>"
        )
    else:
        extra.append(f"hydra.run.dir={_quote(shared_unique_dir(str(cfg.hydra.run.dir)))}")
    named = bool(output_dir or "hydra.run.dir" in keys)
    if named:
        check_writable(run_dir, "output_dir" if output_dir else "hydra.run.dir")
    if resuming:
        _check_changed_config(run_dir if named else "", cfg)
        other = _run_of_checkpoint(cfg.get("resume"))
        if other and (not named or os.path.abspath(other) != os.path.abspath(run_dir)):
            _check_changed_config(other, cfg)  # another run's checkpoint: it must be the same kind of run
    if named:
        # Before Hydra writes .hydra/ into it: a second run must not rewrite the first's record.
        lock_run_folder(run_dir, "output_dir" if output_dir else "hydra.run.dir")
    return [*rest, *overrides, *extra]


def _run_of_checkpoint(resume) -> str | None:
    """The run folder a `resume=<path>` belongs to (the path, or the folder above a
    checkpoint-<step>), when it holds a saved config; None for true/false."""
    if resume in (None, True, False) or str(resume).strip().lower() in (
        "true",
        "false",
        "yes",
        "no",
        "1",
        "0",
    ):
        return None
    path = os.path.abspath(os.path.expanduser(str(resume)))
    for folder in (path, os.path.dirname(path)):
        if os.path.exists(os.path.join(folder, ".hydra", "config.yaml")):
            return folder
    return None


def check_writable(folder: str, key: str) -> None:
    """Refuses a run folder that cannot be written (a read-only mount, no permission), before
    Hydra writes its config there (which would be a traceback) and before any training.

    Probes the folder, or the nearest folder above it that exists, with a temporary file.

    Raises:
        AlignError: naming the key, the folder and the system's reason.
    """
    import tempfile

    probe = os.path.abspath(folder)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(20, "it is a file, not a folder")
        fd, name = tempfile.mkstemp(dir=probe, prefix=".align-write-test-")
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise AlignError(
            f"{key}={folder} cannot be written ({err.strerror or err}"
            f"{'' if probe == os.path.abspath(folder) else f' in {probe}'}): choose a folder you can write to"
        ) from None


LOCK_NAME = ".align.lock"
_HELD: dict[str, int] = {}  # run folder -> the open lock file this process holds


def lock_run_folder(folder: str, key: str = "output_dir") -> None:
    """Takes the run folder for this process, so a second run into it is refused while this one runs.

    An exclusive `flock` on `<folder>/.align.lock`, which holds this run's pid, host and start
    time for the message. The kernel drops the lock when the process ends, however it ends, so
    a crashed run's lock file never blocks a later run. Ranks of a `torchrun` launch share the
    folder: only global rank 0 takes it. Taking a folder this process holds already is a no-op.

    Raises:
        AlignError: another live process holds the folder, naming it.
    """
    import fcntl
    import socket

    if int(os.environ.get("RANK", "0")) != 0:
        return
    folder = os.path.abspath(folder)
    if folder in _HELD:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise AlignError(
            f"{key}={folder} is in use by another align run ({holder}): wait for it to finish, or choose "
            "another folder (two runs in one folder would mix their checkpoints, metrics and model)"
        ) from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode(), 0)
    _HELD[folder] = fd


def unlock_run_folder(folder: str) -> None:
    """Releases a folder taken by `lock_run_folder` (a sweep's job, when it ends)."""
    fd = _HELD.pop(os.path.abspath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the file drops the flock
