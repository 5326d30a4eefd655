"""Before Hydra starts: compose the command line once, and pick the run folder.

`prepare(argv)` composes `conf/config.yaml` with the user's overrides through Hydra's compose
API (every value of a sweep too), so a wrong group option, key or value is one line
(`align: error: ...`) rather than Hydra's report, and before any job starts. It then picks a
run folder that no other run uses (one per `torchrun` launch, shared by its ranks), refuses a
folder that holds a finished run, and warns when a resumed run's settings changed.

Composing and its one-line errors are compose.py; choosing, refusing and locking the folder,
run_folder.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .compose import check_repeated_keys, compose_checked, probe_sets, quote_value
from .errors import AlignError
from .run_folder import (
    check_writable,
    lock_run_folder,
    refuse_finished,
    run_of_checkpoint,
    shared_unique_dir,
    unique_dir,
)

_UNSET = "<unset>"


def _schema_defaults() -> dict:
    """Every key of the typed groups (model, data, peft, ...) at its default, as plain values."""
    import dataclasses

    def plain(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = plain(type(default)) if dataclasses.is_dataclass(default) else default
        return out

    return plain(schema.AlignConfig)


def config_differences(old, new, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain config dicts (`old`: the
    one a run was saved with).

    A key the saved config lacks while the new one holds it at the schema's default is no
    difference: a later align added that key, and its default reads the run as it was made.
    """
    if defaults is None and not prefix:
        defaults = _schema_defaults()
    defaults = defaults if isinstance(defaults, dict) else {}
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.", defaults.get(key))
        elif a == _UNSET and key in defaults and b == defaults[key]:
            continue
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _resolved(cfg: DictConfig, ignore: set[str]) -> dict:
    """The config as plain values, interpolations resolved and the method's settings as its
    settings class fills them (a message shows rm's `dataset_type: pointwise`, not null); a key
    that does not resolve (a saved config's lost environment variable) keeps its text."""
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
    method = out.get("method")
    if isinstance(method, dict):
        # Runs saved before `method.format` became `method.dataset_type` (rm also had its tables).
        if "format" in method and "dataset_type" not in method:
            method["dataset_type"] = method.pop("format")
        for old in ("formats", "samples"):
            method.pop(old, None)
        try:
            out["method"] = schema.method_settings(method)
        except AlignError:
            pass  # compared as saved
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
    changed = config_differences(old, new)
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
    probes = probe_sets(overrides, args.multirun)
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
                refuse_finished(str(summary.parent), "hydra.sweep.dir")
        else:
            extra.append(f"hydra.sweep.dir={quote_value(unique_dir(sweep_dir))}")
        return [*rest, *overrides, *extra]

    resuming = cfg.get("resume") not in (None, False, "false")
    if output_dir:
        run_dir = str(output_dir)
        refuse_finished(run_dir, "output_dir")
        if "hydra.run.dir" in keys:
            refuse_finished(str(cfg.hydra.run.dir), "hydra.run.dir")
        else:
            # One run, one folder: the config Hydra saves goes beside the model it describes.
            extra.append(f"hydra.run.dir={quote_value(run_dir)}")
    elif "hydra.run.dir" in keys:
        run_dir = str(cfg.hydra.run.dir)
        refuse_finished(run_dir, "hydra.run.dir")
    elif resuming and cfg.get("resume") is True:
        raise AlignError(
            "resume=true continues a run: name its folder with hydra.run.dir=<run folder> "
            "(or output_dir=<run folder>), or pass resume=<checkpoint folder>"
        )
    else:
        extra.append(f"hydra.run.dir={quote_value(shared_unique_dir(str(cfg.hydra.run.dir)))}")
    named = bool(output_dir or "hydra.run.dir" in keys)
    if named:
        check_writable(run_dir, "output_dir" if output_dir else "hydra.run.dir")
    if resuming:
        _check_changed_config(run_dir if named else "", cfg)
        other = run_of_checkpoint(cfg.get("resume"))
        if other and (not named or os.path.abspath(other) != os.path.abspath(run_dir)):
            _check_changed_config(other, cfg)  # another run's checkpoint: it must be the same kind of run
    if named:
        # Before Hydra writes .hydra/ into it: a second run must not rewrite the first's record.
        lock_run_folder(run_dir, "output_dir" if output_dir else "hydra.run.dir")
    return [*rest, *overrides, *extra]
