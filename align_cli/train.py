"""`align train`: compose the config with Hydra, then config -> data -> model -> trainer -> run folder.

`train(cfg)` is the whole job and knows no method's details: the method module named by
`method.name` builds the trainer from a `MethodContext`. Tests call `train(cfg)` directly on
configs made with `align_cli.testing.compose`.

Before Hydra starts, `main()` has preflight.py compose the command line once, so a wrong group
option, key or value is one line (`align: error: ...`) instead of Hydra's report, and pick a
run folder no other run uses. `train()` then checks everything cheap (resume,
quantization, tokenizer, the whole dataset) before any model weights are loaded, and guards
the run (see guard.py): SIGINT/SIGTERM save a checkpoint and stop, a NaN loss stops after
saving the state the failed step started from.
"""

from __future__ import annotations

import json
import logging
import math
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
from .errors import AlignError, TrainingInterrupted, nearest, one_line
from .preflight import _HELD, LOCK_NAME, lock_run_folder, prepare, unlock_run_folder

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
        # Named apart from the trainer's own `train_loss` (the mean over all steps).
        out["loss_first_step"] = float(train_losses[0])
        out["loss_last_step"] = float(train_losses[-1])
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
    wanted = ["loss_first_step", "loss_last_step", *keys, "eval_loss", "global_step"]
    shown = {k: metrics[k] for k in dict.fromkeys(wanted) if k in metrics}
    lines = [f"align: {method} finished in {seconds:.1f}s -> {output_dir}"]
    # An undefined metric (e.g. a correlation over constant scores) is NaN: say so plainly.
    lines += [f"  {k:<32} {f'{v:.4g}' if math.isfinite(v) else 'n/a'}" for k, v in shown.items()]
    print("\n".join(lines), flush=True)


def check_run_folder(output_dir: str, resume, peft_cfg: schema.PeftConfig | None = None) -> str | None:
    """Refuses to write over a finished run, or over an unfinished one without `resume`.

    Args:
        output_dir: this run's folder.
        resume: the `resume` setting (false, true or a path).
        peft_cfg: this run's adapter settings: a checkpoint must hold what it trains (a LoRA
            adapter with `peft=lora`, the full model without).

    Returns:
        The checkpoint to resume from, or None.

    Raises:
        AlignError: `output_dir` holds a finished run (summary.json), checkpoints of an
            unfinished run while `resume` is off, or `resume` names nothing to resume from.
    """
    from .guard import find_checkpoint, scan_checkpoints

    if os.path.exists(os.path.join(output_dir, "summary.json")):
        raise AlignError(
            f"{output_dir} holds a finished run; choose another output_dir (to train it further, "
            f"start from it with model.name_or_path={output_dir})"
        )
    resume_from = find_checkpoint(resume, output_dir)
    complete, incomplete = scan_checkpoints(output_dir)
    found = complete or (incomplete[0][0] if incomplete else None)  # either says a run began here
    if found and resume_from is None:
        raise AlignError(
            f"{output_dir} holds checkpoints of an unfinished run (last: {os.path.basename(found)}): "
            "continue it with resume=true, or choose another output_dir"
        )
    if resume_from is not None and peft_cfg is not None:
        from .guard import checkpoint_kind

        kind, wanted = checkpoint_kind(resume_from), "lora" if peft_cfg.method != "none" else "full"
        if kind != wanted:
            held = "a LoRA adapter" if kind == "lora" else "full model weights"
            raise AlignError(
                f"resume: {resume_from} holds {held}, but this run trains "
                f"{'a LoRA adapter (peft=lora)' if wanted == 'lora' else 'the full model (peft=none)'}: resume a "
                "checkpoint of this run with its own settings, or start from it with model.name_or_path=<folder>"
            )
    return resume_from


# Room for logs, the tokenizer, an adapter and its optimizer state, whatever the model.
MIN_FREE_BYTES = 64 * 2**20


def check_free_space(output_dir: str, model_path: str, full: bool) -> None:
    """Refuses to start on a disk that cannot hold one checkpoint of this run.

    A full fine-tune's checkpoint holds at least the weights (plus optimizer state), so their
    size on disk is the least it needs; a LoRA checkpoint is small.

    Raises:
        AlignError: naming the folder, the free space and the space needed.
    """
    import shutil

    probe = os.path.abspath(output_dir)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    weights = 0
    if full and os.path.isdir(model_path):
        weights = sum(
            os.path.getsize(os.path.join(model_path, f))
            for f in os.listdir(model_path)
            if f.endswith((".safetensors", ".bin"))
        )
    need = MIN_FREE_BYTES + weights
    free = shutil.disk_usage(probe).free
    if free < need:
        raise AlignError(
            f"{output_dir}: only {free / 2**20:.0f} MiB free on its disk, and one checkpoint of this run needs "
            f"at least {need / 2**20:.0f} MiB: free some space, or choose output_dir on another disk"
        )


def _disk_error(err: OSError, output_dir: str) -> AlignError | None:
    """A full disk or an unwritable file while training or saving, as one line (None: another error)."""
    import errno

    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    from .guard import last_checkpoint

    where = err.filename or output_dir
    previous = last_checkpoint(output_dir)
    kept = f"the last complete checkpoint is {previous}" if previous else "no checkpoint was completed"
    return AlignError(
        f"cannot write {where}: {err.strerror or err}; {kept} (free some space or fix the permissions, "
        f"then continue with: {_resume_command(output_dir)})"
    )


def preflight_quant(quant_cfg: schema.QuantConfig, peft_cfg: schema.PeftConfig) -> None:
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
    if quant_cfg.bits == 4:
        from .compat import check_4bit_training

        # A kernel that trains until the first evaluation and then crashes, or passes no
        # gradient, would lose a run hours in: try an eval pass then a backward now.
        problem = check_4bit_training(
            device, quant_cfg.quant_type, modeling.torch_dtype(quant_cfg.compute_dtype)
        )
        if problem:
            raise AlignError(
                f"quant=4bit: bitsandbytes {_version('bitsandbytes')} cannot train on this machine's {device}: "
                f"{problem}; use quant=none, or a bitsandbytes version align supports (see pyproject.toml)"
            )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


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


def check_known_keys(cfg: DictConfig, method: dict) -> None:
    """Keys added with `+` that nothing reads are mistakes (`+method.mdoe=listwise`): name them.

    A method's keys are those of its conf/method/<name>.yaml; the top level's are the schema's.
    A reward set for a method that takes none (only ppo and grpo do) is one too.
    """
    import dataclasses

    top = {f.name for f in dataclasses.fields(schema.AlignConfig)}
    for key in cfg:
        if key not in top and key != "hydra":
            raise AlignError(
                f"'{key}' is not an align option{nearest(str(key), top)}; valid keys: {', '.join(sorted(top))}"
            )
    own = schema.CONF_DIR / "method" / f"{method.get('name')}.yaml"
    if own.exists():
        valid = set(OmegaConf.load(own).keys()) | {"name", "format", "sample", "args"}
        for key in method:
            if key not in valid:
                raise AlignError(
                    f"method.{key} is not a method={method.get('name')} option{nearest(str(key), valid)}; "
                    f"valid keys: {', '.join(sorted(valid))} (trainer settings go under method.args)"
                )
        if "default_reward" not in valid and cfg.get("reward"):
            raise AlignError(
                f"method={method.get('name')} takes no reward (only ppo and grpo do): drop the reward settings "
                f"({', '.join(str(k) for k in cfg.reward)})"
            )


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
        ctx.config = ctx.trl_config(module.config_class())


def checked_config(cfg: DictConfig):
    """The method module, a `MethodContext` (no tokenizer or data yet) and the data config of a
    composed config, after every check that needs neither: the method and its keys, its data
    format, the typed groups and `method.args` (`align train` and `align data validate` alike).

    Raises:
        AlignError: no method, an unknown key, a group key or value that is not valid, or a
            `method.args` key or value the method's config class rejects.
    """
    from .methods import load_method
    from .methods.base import MethodContext

    method = OmegaConf.to_container(cfg.method, resolve=True) if cfg.get("method") else None
    if not method or "name" not in method:
        raise AlignError("no method chosen: add method=<sft|rm|ppo|dpo|kto|grpo>")
    check_known_keys(cfg, method)
    args = method.pop("args", None) or {}
    module = load_method(method["name"])
    check_method_format(method)
    data_cfg = typed(cfg, "data", schema.DataConfig)
    ctx = MethodContext(
        method=method,
        args=args,
        model_cfg=typed(cfg, "model", schema.ModelConfig),
        quant_cfg=typed(cfg, "quant", schema.QuantConfig),
        peft_cfg=typed(cfg, "peft", schema.PeftConfig),
        tokenizer=None,
        train_dataset=None,
        reward=OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") is not None else None,
        seed=int(cfg.get("seed", 42)),
        dist=typed(cfg, "dist", schema.DistConfig),
    )
    from .dist import config_problem

    problem = config_problem(ctx.dist, method["name"], args, ctx.quant_cfg.bits)
    if problem:
        raise AlignError(problem)
    check_method_args(module, ctx)
    if hasattr(module, "check_settings"):  # a method's own keys (e.g. PPO/GRPO's method.collapse)
        module.check_settings(method)
    from . import modeling

    # From the model's config and file headers only: no weights are read.
    modeling.check_target_modules(ctx.model_cfg, ctx.peft_cfg)
    modeling.check_weight_files(modeling.resolve_model_path(ctx.model_cfg))
    return module, ctx, data_cfg


def read_run_data(module, ctx, data_cfg, tokenizer, problems=None):
    """Both splits of a checked config, read and checked as the run will get them: the method's
    standard format, the tokenizer's chat template, the method's prompt room, the rewards' row
    checks. `align train`, `align data validate` and `align data preview` all read through it.

    Args:
        problems: (train, eval) collectors (validate); None: stop at the first problem.

    Returns:
        `data.Splits`.
    """
    from .data import read_splits
    from .methods import prompt_room
    from .rewards import row_check

    return read_splits(
        data_cfg,
        ctx.method["format"],
        conversational=tokenizer.chat_template is not None,
        seed=ctx.seed,
        sample=ctx.method.get("sample"),
        tokenizer=tokenizer,
        room=prompt_room(module, ctx.args, ctx.model_cfg),
        row_check=row_check(ctx.reward),  # values a reward cannot use, named by file:line
        problems=problems,
    )


def train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
    """Runs one training job described by a composed config (see `_train`), holding its run
    folder (`preflight.lock_run_folder`) until it ends."""
    try:
        return _train(cfg, callbacks)
    finally:
        unlock_run_folder(resolve_output_dir(cfg))


def _train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
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
    from .callbacks import MetricsFileCallback, collapse_outcome, finite_or_none
    from .compat import install_atomic_trainer_state
    from .data import data_path
    from .guard import (
        GracefulStop,
        LossGuard,
        NonFiniteLoss,
        StickyInterrupt,
        checkpoint_step,
        trim_metrics,
    )
    from .methods import method_problems
    from .rewards import RewardFailed

    started = time.time()
    module, ctx, data_cfg = checked_config(cfg)
    from . import dist

    problem = dist.launch_problem(ctx.dist)
    if problem:
        raise AlignError(problem)
    dist.prepare(ctx.dist)
    method, args, model_cfg = ctx.method, ctx.args, ctx.model_cfg
    from .terminal import check_trackers
    from .terminal import prepare as prepare_terminal

    check_trackers(args.get("report_to"))
    prepare_terminal(bool(cfg.get("quiet")), bool(cfg.get("verbose")))
    # Filled in as the run goes: the tokenizer and data come after the cheap checks.
    ctx.output_dir = output_dir = resolve_output_dir(cfg)
    lock_run_folder(output_dir)  # held already when preflight named the folder; a sweep's job here
    resume_from = check_run_folder(output_dir, cfg.get("resume"), ctx.peft_cfg)
    preflight_quant(ctx.quant_cfg, ctx.peft_cfg)
    check_free_space(output_dir, modeling.resolve_model_path(model_cfg), ctx.peft_cfg.method == "none")

    # Until training starts, Ctrl-C stops the run even where a library swallows it (datasets).
    with StickyInterrupt():
        # The tokenizer is cheap and decides whether prompts become chat messages; the data is
        # read and checked completely before any model weights are loaded.
        tokenizer = modeling.load_tokenizer(model_cfg)
        splits = read_run_data(module, ctx, data_cfg, tokenizer)
        # The method's own checks (settings, rewards, the columns they read): as validate runs them.
        problems = method_problems(module, ctx, splits.train.rows)
        if problems:
            more = (
                f" (and {len(problems) - 1} more: `align data validate` lists them)"
                if len(problems) > 1
                else ""
            )
            raise AlignError(problems[0] + more)
        train_ds, eval_ds = splits.datasets()
        log.info(
            "data: %d train rows, %d eval rows", len(train_ds), len(eval_ds) if eval_ds is not None else 0
        )

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
        from .terminal import install as show_progress  # one bar and compact eval lines (quiet/verbose)

        show_progress(
            trainer, getattr(module, "SUMMARY_KEYS", []), bool(cfg.get("quiet")), bool(cfg.get("verbose"))
        )

    install_atomic_trainer_state()
    stop.install()
    try:
        try:
            if resume_from and finished_checkpoint(resume_from, trainer):
                # The run stopped after its last step (killed while saving or evaluating):
                # trainers would take one step more; finish from the checkpoint instead.
                restore_checkpoint(trainer, resume_from)
            elif resume_from:
                trainer.train(resume_from_checkpoint=resume_from)
            else:  # no keyword when starting fresh: a custom trainer's train() may not take it
                trainer.train()
        except NonFiniteLoss as err:
            _close_progress_bars(trainer)
            raise AlignError(_diverged(trainer, err.step, err.what, args, output_dir)) from None
        except RewardFailed as err:
            # Raised while scoring, before the step's update: the weights are the last step's.
            _close_progress_bars(trainer)
            stopped = f" (a {signal.Signals(stop.signum).name} came during the call)" if stop.signum else ""
            raise AlignError(f"{err}{stopped}{_save_state(trainer, output_dir)}") from None
        if loss_guard.bad is not None:
            step, key, value = loss_guard.bad
            raise AlignError(_diverged(trainer, step, f"{key} became {value}", args, output_dir, saved=False))
        if stop.stopped_at is not None:
            raise TrainingInterrupted(_interrupted(stop, output_dir), stop.signum)
        # PPO/GRPO: collapse signatures; after a stop on collapse, the last good checkpoint is loaded.
        diagnosis = collapse_outcome(trainer, output_dir)
        # A signal after the last step: skip the final evaluation, but save the finished model.
        final_eval = {}
        if eval_ds is not None and stop.signum is None:
            final_eval = evaluated_at_end(trainer) or trainer.evaluate()

        # The model (or adapter) and tokenizer go to the run folder's root, so the folder itself is
        # what `model.name_or_path=<run folder>` or from_pretrained(<run folder>) takes.
        trainer.save_model(output_dir)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(output_dir)
            keys = getattr(module, "SUMMARY_KEYS", [])
            metrics = summarize(trainer, keys, final_eval)
            with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
                # Strict JSON: an undefined metric (NaN) is null.
                strict = {k: finite_or_none(v) for k, v in metrics.items()}
                summary = {"method": method["name"], "metrics": strict, **diagnosis}
                json.dump(summary, f, indent=2, allow_nan=False, ensure_ascii=False)
            if cfg.get("plot", True):
                from .plot import plot_metrics

                plot_metrics(
                    Path(output_dir) / "metrics.jsonl", Path(output_dir) / "training_curves.svg", keys
                )
                watched = getattr(module, "DIAGNOSTIC_KEYS", None)
                if watched:  # PPO/GRPO: the collapse watch's curves
                    plot_metrics(
                        Path(output_dir) / "metrics.jsonl",
                        Path(output_dir) / "diagnostics.svg",
                        only=watched,
                        max_panels=len(watched),
                    )
            from .card import write_run_card  # ours replaces TRL's card (written at each checkpoint)

            rows = (len(train_ds), len(eval_ds) if eval_ds is not None else 0)
            write_run_card(output_dir, cfg, metrics, *rows, data_path(data_cfg, method.get("sample")))
            print_summary(method["name"], output_dir, metrics, keys, time.time() - started)
        else:
            metrics = {}
        if stop.signum is not None:
            raise TrainingInterrupted(
                f"interrupted after the last step: the finished model is saved in {output_dir} "
                "(final evaluation skipped)",
                stop.signum,
            )
    except OSError as err:  # a full disk or an unwritable file, while training or saving
        mapped = _disk_error(err, output_dir)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        stop.uninstall()
        _close_progress_bars(trainer)
    return RunResult(output_dir=output_dir, metrics=metrics, trainer=trainer)


def finished_checkpoint(checkpoint: str, trainer) -> bool:
    """Whether `checkpoint` is at the run's last step: `method.args.max_steps` when set, else the
    step count the run planned when it started (trainer_state.json's max_steps)."""
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    wanted = getattr(trainer.args, "max_steps", -1)
    last = wanted if wanted and wanted > 0 else int(state.get("max_steps") or 0)
    return last > 0 and int(state["global_step"]) >= last


def restore_checkpoint(trainer, checkpoint: str) -> None:
    """Loads a checkpoint's weights and training state without training (see `finished_checkpoint`)."""
    from transformers import TrainerState

    from .compat import load_checkpoint

    log.info("%s is the run's last step: nothing left to train, finishing the run from it", checkpoint)
    load_checkpoint(trainer, checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))


def evaluated_at_end(trainer) -> dict[str, float]:
    """The eval metrics the trainer logged at its last step ({} if it did not evaluate there).

    A run whose eval schedule hits the last step has evaluated the final model already; a
    second pass would add duplicate records, and for a sampling evaluation (PPO) other numbers.
    """
    state = getattr(trainer, "state", None)
    for record in reversed(getattr(state, "log_history", None) or []):
        if record.get("step") != state.global_step:
            break
        found = {k: v for k, v in record.items() if k.startswith("eval_")}
        if found:
            return found
    return {}


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


def _save_state(trainer, output_dir: str) -> str:
    """Saves the state after the last completed step (the one the failed step started from) as a
    checkpoint when its weights are finite; says where, or names the last checkpoint there is."""
    from .compat import save_checkpoint
    from .guard import last_checkpoint, params_finite

    good = trainer.state.global_step
    # Weights, optimizer, scheduler and RNG as they were after step `good`: a valid resume point.
    if good > 0 and params_finite(trainer.model) and save_checkpoint(trainer):
        return f"; saved the state it started from (step {good}) to {output_dir}/checkpoint-{good}"
    previous = last_checkpoint(output_dir)
    return f"; the last checkpoint with finite weights is {previous}" if previous else "; nothing saved"


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
    from .guard import last_checkpoint

    if saved:
        where = _save_state(trainer, output_dir)
    else:
        previous = last_checkpoint(output_dir)
        where = f"; the last checkpoint with finite weights is {previous}" if previous else "; nothing saved"
    lr = args.get("learning_rate", getattr(trainer.args, "learning_rate", None))
    lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
    return f"{what} at step {step}{where}: lower method.args.learning_rate (now {lr}) or check the data"


def fail(err: BaseException | str, code: int | None = None) -> None:
    """Prints `align: error: <one line>` on stderr and exits (`align: <line>` for an interrupt)."""
    message = " ".join(str(err).split("\n")).strip() or type(err).__name__
    prefix = "align:" if isinstance(err, TrainingInterrupted) else "align: error:"
    print(f"{prefix} {message}", file=sys.stderr, flush=True)
    sys.exit(code if code is not None else getattr(err, "exit_code", 1))


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(schema.CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        debug = bool(cfg.get("debug", False))
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return _sweep_job(cfg, hydra_cfg, debug)
        try:
            train(cfg)
        except TrainingInterrupted as err:
            if debug:
                raise
            fail(err)
        except AlignError as err:
            if debug:
                raise
            _remove_if_untouched(hydra_cfg.runtime.output_dir)
            fail(err)
        except KeyboardInterrupt:
            if debug:
                raise
            run_dir = hydra_cfg.runtime.output_dir
            if _remove_if_untouched(run_dir):
                fail("interrupted before training started (nothing to save)", 128 + signal.SIGINT)
            fail(f"interrupted (nothing saved since the last checkpoint in {run_dir})", 128 + signal.SIGINT)
        return None

    _main()
    sweep_dir = _sweep_dir_of(sys.argv)
    if sweep_dir and os.path.isdir(sweep_dir):
        from .sweep import report

        # Again in this process: with a launcher whose jobs run elsewhere (submitit), the last
        # job's own report may predate another's end.
        result = report(sweep_dir)
        failed = [j for j in result["jobs"] if j["status"] != "finished"]
        print(f"align: sweep results: {os.path.join(sweep_dir, 'results.md')}", file=sys.stderr, flush=True)
        if failed:
            fail(f"{len(failed)} job(s) of the sweep failed: {', '.join(j['run_dir'] for j in failed)}")


def _sweep_job(cfg: DictConfig, hydra_cfg, debug: bool) -> float | None:
    """One job of a multirun: trains, records `job.json`, refreshes the sweep's results table.

    Returns the job's `sweep.metric` (what a Hydra sweeper such as Optuna optimises), or None
    for a failed job or an undefined value, which Optuna records as a failed trial, not a score.
    One failed job does not stop the sweep; an interrupt (the user asked to stop) does.
    """
    from .sweep import default_metric, job_record, metric_value, report, write_job

    job_dir, num = hydra_cfg.runtime.output_dir, hydra_cfg.job.num
    overrides = list(hydra_cfg.overrides.task)
    started = time.time()
    sweep_cfg = cfg.get("sweep") or {}
    metric, direction = default_metric(sweep_cfg.get("metric"), sweep_cfg.get("direction", "auto"))

    def record(status: str, error: str = "") -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            write_job(job_dir, job_record(job_dir, num, overrides, status, started, error))
            report(hydra_cfg.sweep.dir, metric, direction)

    ranks_from_submitit()
    try:
        result = train(cfg)
    except TrainingInterrupted as err:
        record("interrupted", str(err))
        if debug:
            raise
        fail(err)  # a sweep stops too: the user asked to stop
    except AlignError as err:
        record("failed", str(err))
        if debug:
            raise
        print(f"align: error: job {num}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return None
    except KeyboardInterrupt:
        record("interrupted", "interrupted")
        if debug:
            raise
        fail(f"interrupted (nothing saved since the last checkpoint in {job_dir})", 128 + signal.SIGINT)
    except Exception as err:  # a bug: recorded, then Hydra reports it with its traceback
        record("failed", f"{type(err).__name__}: {one_line(str(err))}")
        raise
    record("finished")
    if (
        int(os.environ.get("RANK", "0")) == 0
        and metric not in result.metrics
        and not (metric == "eval_loss" and "loss_last_step" in result.metrics)
    ):
        # A name no job will report: every trial would fail; stop the sweep now, saying so.
        fail(
            f"sweep.metric={metric} is not in this run's summary.json; it has: "
            f"{', '.join(sorted(result.metrics))}"
        )
    return metric_value(result.metrics, metric)


def ranks_from_submitit() -> None:
    """Under submitit (hydra/launcher=submitit_slurm|submitit_local) with several tasks, each task
    is one DDP rank: export RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous as torchrun would,
    so accelerate and align read them the same way. A torchrun launch inside a task is left alone.
    """
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Every rank keeps seeing all GPUs: accelerate picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _sweep_dir_of(argv: list[str]) -> str | None:
    """The multirun folder named on the command line (`prepare` always adds it), else None."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    for arg in argv:
        if arg.startswith("hydra.sweep.dir="):
            return arg.split("=", 1)[1].strip("'\"")
    return None


def _remove_if_untouched(run_dir: str) -> bool:
    """Deletes a run folder that holds only what Hydra put there (a run that stopped before it
    began); True if it did."""
    try:
        if os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {".hydra", "train.log", LOCK_NAME}:
            import shutil

            shutil.rmtree(run_dir)
            parent = os.path.dirname(os.path.abspath(run_dir))
            if not os.listdir(parent):  # outputs/<method>/ made for this run alone
                os.rmdir(parent)
            return True
    except OSError:
        pass
    return False


def _wants_debug(argv: list[str]) -> bool:
    return any(a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)


def main(argv: list[str]) -> None:
    """Entry for `align train ...`: checks the command line, then Hydra reads it from sys.argv."""
    if {"--help", "-h"} & set(argv) and not any(a.startswith("method=") for a in argv):
        # Help composes the config, and `method` has no default: show it for the demo's method.
        argv = [*argv, "method=dpo"]
    argv = ["quiet=true" if a in ("-q", "--quiet") else a for a in argv]
    argv = schema.normalize_overrides(list(argv))
    try:
        argv = prepare(argv)
    except AlignError as err:
        if _wants_debug(argv):
            raise
        fail(err)
    sys.argv = ["align train", *argv]
    try:
        _hydra_entry()
    finally:
        for folder in list(_HELD):  # taken by prepare for a run that never reached train()
            unlock_run_folder(folder)
