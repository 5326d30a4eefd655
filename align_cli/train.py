"""`align train`: compose the config with Hydra, then config -> data -> model -> trainer -> run folder.

`train(cfg)` is the whole job and knows no method's details: the method module named by
`method.name` builds the trainer from a `MethodContext`. Tests call `train(cfg)` directly on
configs made with `align_cli.testing.compose`.

Before Hydra starts, `main()` composes the command line once with Hydra's compose API, so a
wrong group option, key or value is one line (`align: error: ...`) instead of Hydra's report,
and picks a run folder no other run uses. `train()` then checks everything cheap (resume,
quantization, tokenizer, the whole dataset) before any model weights are loaded, and guards
the run (see guard.py): SIGINT/SIGTERM save a checkpoint and stop, a NaN loss stops after
saving the state the failed step started from.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .errors import AlignError, TrainingInterrupted, hydra_message, nearest, one_line

log = logging.getLogger("align")

schema.register()


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: Any = None


def typed(cfg: DictConfig, key: str, cls: type):
    """Converts one config group to its dataclass (DictConfig stops here).

    Raises:
        AlignError: a key the dataclass does not have (added with `+group.key=...`), named with
            the nearest valid keys.
    """
    import dataclasses

    node = cfg.get(key)
    if node is None:
        return cls()
    values = OmegaConf.to_container(node, resolve=True)
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in valid:
            raise AlignError(
                f"{key}.{name} is not a {key} option{nearest(name, valid)}; valid keys: {', '.join(valid)}"
            )
    return cls(**values)


def resolve_output_dir(cfg: DictConfig) -> str:
    if cfg.get("output_dir"):
        return str(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _last_logged(history: list[dict], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


def summarize(trainer, summary_keys: list[str], final_eval: dict[str, float]) -> dict[str, float]:
    """Final train loss and the method's key metrics (last logged values, then the final eval)."""
    history = trainer.state.log_history
    out: dict[str, float] = {}
    train_losses = [e["loss"] for e in history if "loss" in e]
    if train_losses:
        out["train_loss_first"] = float(train_losses[0])
        out["train_loss"] = float(train_losses[-1])
    for key in summary_keys:
        value = final_eval.get(key, _last_logged(history, key))
        if value is not None:
            out[key] = float(value)
    for key, value in final_eval.items():
        if isinstance(value, (int, float)) and key not in out:
            out[key] = float(value)
    out["global_step"] = float(trainer.state.global_step)
    return out


def print_summary(
    method: str, output_dir: str, metrics: dict[str, float], keys: list[str], seconds: float
) -> None:
    """Prints the final loss and the method's key metrics (summary.json holds them all)."""
    wanted = ["train_loss_first", "train_loss", *keys, "eval_loss", "global_step"]
    shown = {k: metrics[k] for k in dict.fromkeys(wanted) if k in metrics}
    lines = [f"align: {method} finished in {seconds:.1f}s -> {output_dir}"]
    lines += [f"  {k:<32} {v:.4g}" for k, v in shown.items()]
    print("\n".join(lines), flush=True)


def check_run_folder(output_dir: str, resume) -> str | None:
    """Refuses to write over a finished run, or over an unfinished one without `resume`.

    Args:
        output_dir: this run's folder.
        resume: the `resume` setting (false, true or a path).

    Returns:
        The checkpoint to resume from, or None.

    Raises:
        AlignError: `output_dir` holds a finished run (summary.json), checkpoints of an
            unfinished run while `resume` is off, or `resume` names nothing to resume from.
    """
    from .guard import find_checkpoint, last_checkpoint

    if os.path.exists(os.path.join(output_dir, "summary.json")):
        raise AlignError(
            f"{output_dir} holds a finished run; choose another output_dir (to train it further, "
            f"start from it with model.name_or_path={output_dir})"
        )
    resume_from = find_checkpoint(resume, output_dir)
    found = last_checkpoint(output_dir)
    if found and resume_from is None:
        raise AlignError(
            f"{output_dir} holds checkpoints of an unfinished run (last: {os.path.basename(found)}): "
            "continue it with resume=true, or choose another output_dir"
        )
    return resume_from


def preflight_quant(quant_cfg: schema.QuantConfig, peft_cfg: schema.PeftSettings) -> None:
    """Checks that `quant=4bit|8bit` can run here, before any data or weights are read.

    Raises:
        AlignError: quantization without LoRA, or bitsandbytes that does not import or cannot
            quantize a tensor on this machine's device.
    """
    if not quant_cfg.bits:
        return
    if peft_cfg.method == "none":
        raise AlignError(
            f"quant={quant_cfg.bits}bit needs peft=lora: quantized weights cannot be trained directly"
        )
    from . import modeling

    modeling.bnb_config(quant_cfg)  # validates the settings and imports bitsandbytes
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # Importing can succeed while the native library cannot run (no kernel for this
        # device, a CUDA mismatch): quantize one small tensor the way loading will.
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(
            torch.ones(64, 64, device=device, dtype=torch.float32), quant_type=quant_cfg.quant_type
        )
    except Exception as err:
        raise AlignError(
            f"quant={quant_cfg.bits}bit: bitsandbytes cannot run on this machine's {device} "
            f"({type(err).__name__}: {one_line(str(err))}); use quant=none, or install a bitsandbytes "
            "build for this device"
        ) from None


def check_method_format(method: dict) -> str:
    """The method's standard data format (formats.py), or an AlignError saying why there is none.

    A method yaml may derive `format` from another key (rm: `method.mode`) and put the reason
    there when that key is wrong.
    """
    from .data.formats import STANDARD_FORMATS

    fmt = str(method.get("format", ""))
    if fmt not in STANDARD_FORMATS:
        raise AlignError(
            f"method={method.get('name')} has no valid data format: {fmt or 'format is not set'}"
        )
    return fmt


def check_method_args(module, ctx) -> None:
    """Builds the method's trainer config once up front, so a typo in method.args fails now.

    Raises:
        AlignError: an unknown key (named, with the nearest valid ones) or a rejected value.
    """
    if not hasattr(module, "config_class"):
        return
    # Quietly: the trainer builds this config again and shows its deprecation warnings then.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx.trl_config(module.config_class())


def train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
    """Runs one training job described by a composed config.

    Args:
        cfg: the composed config (`align_cli.testing.compose` or Hydra).
        callbacks: extra transformers TrainerCallbacks (tests, notebooks).

    Raises:
        AlignError: any user mistake, found before model weights are loaded where possible;
            a loss that became NaN or infinite (after saving the state the failed step started
            from, when its weights are finite).
        TrainingInterrupted: SIGINT/SIGTERM stopped training after saving a checkpoint.
    """
    from . import modeling
    from .callbacks import MetricsFileCallback, plot_metrics
    from .data import load_datasets
    from .guard import GracefulStop, LossGuard, NonFiniteLoss, checkpoint_step, trim_metrics
    from .methods import load_method
    from .methods.base import MethodContext

    started = time.time()
    method = OmegaConf.to_container(cfg.method, resolve=True) if cfg.get("method") else None
    if not method or "name" not in method:
        raise AlignError("no method chosen: add method=<sft|rm|ppo|dpo|kto|grpo>")
    args = method.pop("args", None) or {}
    module = load_method(method["name"])
    check_method_format(method)
    model_cfg = typed(cfg, "model", schema.ModelConfig)
    data_cfg = typed(cfg, "data", schema.DataConfig)
    peft_cfg = typed(cfg, "peft", schema.PeftSettings)
    quant_cfg = typed(cfg, "quant", schema.QuantConfig)
    reward = OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") is not None else None
    output_dir = resolve_output_dir(cfg)
    resume_from = check_run_folder(output_dir, cfg.get("resume"))
    # Filled in as the run goes: the tokenizer and data come after the cheap checks.
    ctx = MethodContext(
        method=method,
        args=args,
        model_cfg=model_cfg,
        quant_cfg=quant_cfg,
        peft_cfg=peft_cfg,
        tokenizer=None,
        train_dataset=None,
        reward=reward,
        output_dir=output_dir,
        seed=int(cfg.seed),
    )
    check_method_args(module, ctx)
    preflight_quant(quant_cfg, peft_cfg)

    # The tokenizer is cheap and decides whether prompts become chat messages; the data is
    # read and checked completely before any model weights are loaded.
    tokenizer = modeling.load_tokenizer(model_cfg)
    train_ds, eval_ds = load_datasets(
        data_cfg,
        method["format"],
        conversational=tokenizer.chat_template is not None,
        seed=int(cfg.seed),
        sample=method.get("sample"),
        tokenizer=tokenizer,
        max_length=model_cfg.max_length,
    )
    log.info("data: %d train rows, %d eval rows", len(train_ds), len(eval_ds) if eval_ds is not None else 0)

    from transformers import set_seed

    set_seed(int(cfg.seed))
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if int(os.environ.get("RANK", "0")) == 0:  # one writer per run folder (torchrun ranks share it)
        if resume_from is not None:
            trim_metrics(metrics_path, checkpoint_step(resume_from))
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)  # left by a run that died before its first checkpoint
    stop, loss_guard = GracefulStop(), LossGuard()
    ctx.tokenizer, ctx.train_dataset, ctx.eval_dataset = tokenizer, train_ds, eval_ds
    ctx.callbacks = [MetricsFileCallback(metrics_path), stop, loss_guard, *(callbacks or [])]
    trainer = module.build(ctx)
    handler = getattr(trainer, "callback_handler", None)
    for callback in ctx.callbacks if handler is not None else []:
        if callback not in handler.callbacks:  # a builder that did not pass ctx.callbacks on
            trainer.add_callback(callback)
    loss_guard.attach(trainer)

    stop.install()
    try:
        try:
            # No keyword when starting fresh: a custom trainer's train() may not take it.
            trainer.train(resume_from_checkpoint=resume_from) if resume_from else trainer.train()
        except NonFiniteLoss as err:
            _close_progress_bars(trainer)
            raise AlignError(_diverged(trainer, err.step, err.what, args, output_dir)) from None
        if loss_guard.bad is not None:
            step, key, value = loss_guard.bad
            raise AlignError(_diverged(trainer, step, f"{key} became {value}", args, output_dir, saved=False))
        if stop.stopped_at is not None:
            raise TrainingInterrupted(_interrupted(stop, output_dir), stop.signum)
        # A signal after the last step: skip the final evaluation, but save the finished model.
        final_eval = trainer.evaluate() if eval_ds is not None and stop.signum is None else {}

        # The model (or adapter) and tokenizer go to the run folder's root, so the folder itself is
        # what `model.name_or_path=<run folder>` or from_pretrained(<run folder>) takes.
        trainer.save_model(output_dir)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(output_dir)
            keys = getattr(module, "SUMMARY_KEYS", [])
            metrics = summarize(trainer, keys, final_eval)
            with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump({"method": method["name"], "metrics": metrics}, f, indent=2)
            if cfg.get("plot", True):
                plot_metrics(
                    Path(output_dir) / "metrics.jsonl", Path(output_dir) / "training_curves.svg", keys
                )
            print_summary(method["name"], output_dir, metrics, keys, time.time() - started)
        else:
            metrics = {}
        if stop.signum is not None:
            raise TrainingInterrupted(
                f"interrupted after the last step: the finished model is saved in {output_dir} "
                "(final evaluation skipped)",
                stop.signum,
            )
    finally:
        stop.uninstall()
        _close_progress_bars(trainer)
    return RunResult(output_dir=output_dir, metrics=metrics, trainer=trainer)


def _close_progress_bars(trainer) -> None:
    """Closes the training bar an exception left open, so it does not redraw after our message."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None and hasattr(bar, "close"):
                bar.close()
                setattr(callback, name, None)


def _resume_command(output_dir: str) -> str:
    """The command that continues this run: the same overrides, `resume=true` and the run folder."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [
            o
            for o in HydraConfig.get().overrides.task
            if not o.lstrip("+~").startswith(("resume=", "output_dir=", "hydra.run.dir="))
        ]
    except ValueError:  # not under Hydra (tests, notebooks)
        pass
    overrides = [o.replace("++method.args.", "method.args.", 1) for o in overrides]
    return " ".join(["align train", *overrides, "resume=true", f"hydra.run.dir={output_dir}"])


def _interrupted(stop, output_dir: str) -> str:
    name = signal.Signals(stop.signum).name
    return (
        f"stopped by {name} at step {stop.stopped_at}; saved {output_dir}/checkpoint-{stop.stopped_at}; "
        f"continue with: {_resume_command(output_dir)}"
    )


def _diverged(trainer, step: int, what: str, args: dict, output_dir: str, saved: bool = True) -> str:
    """Saves the state the failed step started from (if its weights are finite); says what happened.

    Args:
        trainer: the trainer, stopped inside step `step`.
        step: the step whose loss, gradients or outputs were not finite; not applied.
        what: e.g. "loss became nan".
        args: method.args (for the learning rate in the hint).
        output_dir: the run folder.
        saved: False when the bad step was already applied (seen in the logs, after the fact):
            only an earlier checkpoint is named then.
    """
    from .guard import last_checkpoint, params_finite

    good = trainer.state.global_step
    if saved and good > 0 and params_finite(trainer.model) and hasattr(trainer, "_save_checkpoint"):
        # Weights, optimizer, scheduler and RNG as they were after step `good`: a valid resume point.
        trainer._save_checkpoint(trainer.model, trial=None)
        where = f"; saved the state it started from (step {good}) to {output_dir}/checkpoint-{good}"
    else:
        previous = last_checkpoint(output_dir)
        where = f"; the last checkpoint with finite weights is {previous}" if previous else "; nothing saved"
    lr = args.get("learning_rate", getattr(trainer.args, "learning_rate", None))
    lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
    return f"{what} at step {step}{where}: lower method.args.learning_rate (now {lr}) or check the data"


# --------------------------------------------------------------------------------------
# The command line: compose once up front so every mistake is one line


def compose_checked(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Composes conf/config.yaml as `align` does; a composition problem is a one-line AlignError.

    Args:
        overrides: command-line overrides, already normalized (`method.args.k` -> `++...`).
        return_hydra_config: keep the `hydra` node (to read the run folder).

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
            raise AlignError(
                f"cannot parse '{override.replace('++method.args.', 'method.args.')}': {one_line(str(err))} "
                "(see https://hydra.cc/docs/advanced/override_grammar/basic/)"
            ) from err
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3", job_name="align"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)
    except Exception as err:
        # Show overrides as typed: `method.args.k=v`, not the `++` form normalize_overrides made.
        message = hydra_message(err, _culprit(err, overrides)).replace("++method.args.", "method.args.")
        raise AlignError(message) from err
    finally:
        GlobalHydra.instance().clear()


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
            key = override.key_or_group + (f"@{override.package}" if override.package else "")
            prefix = _PREFIX.get(override.type.name, "")
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


def _warn_changed_config(run_dir: str, cfg: DictConfig) -> None:
    """Warns when a resumed run's settings differ from those it was started with."""
    saved = os.path.join(run_dir, ".hydra", "config.yaml")
    if not run_dir or not os.path.exists(saved):
        return
    ignore = {"resume", "output_dir", "debug", "plot", "hydra"}
    old = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(saved)).items() if k not in ignore}
    new = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ignore}
    changed = _differences(old, new)
    if changed:
        print(
            f"align: warning: resuming with settings that differ from the run's: {'; '.join(changed[:8])}",
            file=sys.stderr,
            flush=True,
        )


def prepare(argv: list[str]) -> list[str]:
    """Checks the command line and picks the run folder before Hydra starts.

    Returns the argv to hand to Hydra: its flags first, then the overrides, plus
    `hydra.run.dir=` (or `hydra.sweep.dir=`) naming a folder no other run uses.

    Raises:
        AlignError: a composition problem (one line), or a run folder holding a finished run.
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_intermixed_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun:
        return argv
    overrides = list(args.overrides)
    rest = list(argv)
    for override in overrides:  # what is left are Hydra's flags, in their order
        rest.remove(override)
    probes = _probe_sets(overrides, args.multirun)
    cfg = compose_checked(probes[0], return_hydra_config=True)
    for probe in probes[1:]:
        compose_checked(probe)
    if args.cfg or args.config_name or args.config_path or args.config_dir:
        return [*rest, *overrides]  # printing the config, or another config tree: nothing to run

    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    output_dir = cfg.get("output_dir")
    extra = []
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
    if resuming:
        _warn_changed_config(run_dir if output_dir or "hydra.run.dir" in keys else "", cfg)
    return [*rest, *overrides, *extra]


def fail(err: BaseException | str, code: int | None = None) -> None:
    """Prints `align: error: <one line>` on stderr and exits (`align: <line>` for an interrupt)."""
    message = " ".join(str(err).split("\n")).strip() or type(err).__name__
    prefix = "align:" if isinstance(err, TrainingInterrupted) else "align: error:"
    print(f"{prefix} {message}", file=sys.stderr, flush=True)
    sys.exit(code if code is not None else getattr(err, "exit_code", 1))


_FAILED_JOBS: list[str] = []


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(schema.CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        debug = bool(cfg.get("debug", False))
        try:
            train(cfg)
        except TrainingInterrupted as err:
            if debug:
                raise
            fail(err)  # a sweep stops too: the user asked to stop
        except AlignError as err:
            if debug:
                raise
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # One bad job (a diverging learning rate...) does not stop the sweep.
                job_dir = HydraConfig.get().runtime.output_dir
                job = HydraConfig.get().job.num
                print(f"align: error: job {job}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
                _FAILED_JOBS.append(job_dir)
                return
            fail(err)
        except KeyboardInterrupt:
            if debug:
                raise
            fail("interrupted (nothing saved since the last checkpoint)", 128 + signal.SIGINT)

    _FAILED_JOBS.clear()
    _main()
    if _FAILED_JOBS:
        fail(f"{len(_FAILED_JOBS)} job(s) of the sweep failed: {', '.join(_FAILED_JOBS)}")


def _wants_debug(argv: list[str]) -> bool:
    return any(a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)


def main(argv: list[str]) -> None:
    """Entry for `align train ...`: checks the command line, then Hydra reads it from sys.argv."""
    if {"--help", "-h"} & set(argv) and not any(a.startswith("method=") for a in argv):
        # Help composes the config, and `method` has no default: show it for the demo's method.
        argv = [*argv, "method=dpo"]
    argv = schema.normalize_overrides(list(argv))
    try:
        argv = prepare(argv)
    except AlignError as err:
        if _wants_debug(argv):
            raise
        fail(err)
    sys.argv = ["align train", *argv]
    _hydra_entry()
