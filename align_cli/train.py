"""`align train`'s recipe: `train(cfg)` takes a composed config to a finished run folder.

`train(cfg)` is the whole job and knows no method's details: the method module named by
`method.name` builds the trainer from a `MethodContext`. Tests call `train(cfg)` directly on
configs made with `align_cli.testing.compose`; the command line reaches it through launch.py.

It checks everything cheap first (run_checks.py: the config, quantization; run_folder.py:
resume, disk space; then the tokenizer and the whole dataset) before any model weights are
loaded, and guards the run (see guard.py): SIGINT/SIGTERM save a checkpoint and stop, a NaN
loss stops after saving the state the failed step started from.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import collector
from . import config as schema
from .errors import AlignError, TrainingInterrupted
from .run_checks import checked_config, checked_run_data, preflight_quant
from .run_folder import (
    check_free_space,
    check_run_folder,
    close_progress_bars,
    disk_error,
    diverged,
    evaluated_at_end,
    finished_checkpoint,
    interrupted_message,
    lock_run_folder,
    print_summary,
    resolve_output_dir,
    restore_checkpoint,
    save_state,
    summarize,
    unlock_run_folder,
)

log = logging.getLogger("align")

schema.register()


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: Any = None


def train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
    """Runs one training job described by a composed config (see `_train`), holding its run
    folder (`run_folder.lock_run_folder`) until it ends."""
    try:
        return _train(cfg, callbacks)
    finally:
        unlock_run_folder(resolve_output_dir(cfg))


@dataclass
class RunPlan:
    """A run checked and read, before any model weights load (`plan_run`)."""

    cfg: DictConfig
    module: Any  # the method module (align_cli/methods/<name>.py)
    ctx: Any  # its MethodContext: settings, typed groups, tokenizer, datasets, callbacks
    data_cfg: Any
    output_dir: str
    resume_from: str | None
    started: float  # when the run began (checks included), for the summary line

    @property
    def summary_keys(self) -> list[str]:
        return getattr(self.module, "SUMMARY_KEYS", [])


def _train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
    """Runs one training job described by a composed config: plan -> build -> run -> write.

    Args:
        cfg: the composed config (`align_cli.testing.compose` or Hydra).
        callbacks: extra transformers TrainerCallbacks (tests, notebooks).

    Raises:
        AlignError: any user mistake, found before model weights are loaded where possible;
            a loss that became NaN or infinite (after saving the state the failed step started
            from, when its weights are finite).
        TrainingInterrupted: SIGINT/SIGTERM stopped training after saving a checkpoint.
    """
    from .guard import GracefulStop, LossGuard, StickyInterrupt

    # The cyclic collector: what the run froze goes back to it at the end (align_cli/collector.py).
    with collector.run_scope():
        # Until training starts, Ctrl-C stops the run even where a library swallows it (datasets).
        with StickyInterrupt():
            plan = plan_run(cfg)
            stop, loss_guard = GracefulStop(), LossGuard()
            trainer = build_trainer(plan, [stop, loss_guard, *(callbacks or [])], loss_guard)
        return _run_built(plan, trainer, stop, loss_guard)


def _run_built(plan: RunPlan, trainer: Any, stop, loss_guard) -> RunResult:
    """Trains a built trainer and writes the run folder (`_train`'s second half)."""
    from .compat import install_atomic_trainer_state

    install_atomic_trainer_state()
    stop.install()
    try:
        try:
            final_eval, diagnosis = run_trainer(plan, trainer, stop, loss_guard)
            metrics = write_run_folder(plan, trainer, final_eval, diagnosis)
        except OSError as err:  # a full disk or an unwritable file, while training or saving
            mapped = disk_error(err, plan.output_dir)
            if mapped is None:
                raise
            raise mapped from None
        if stop.signum is not None:
            raise TrainingInterrupted(
                f"interrupted after the last step: the finished model is saved in {plan.output_dir} "
                "(final evaluation skipped)",
                stop.signum,
            )
    finally:
        stop.uninstall()
        close_progress_bars(trainer)
    return RunResult(output_dir=plan.output_dir, metrics=metrics, trainer=trainer)


def plan_run(cfg: DictConfig) -> RunPlan:
    """Every check that needs no weights, the run folder chosen and locked, the data read.

    The config and its typed groups (run_checks.checked_config, as `align data validate`), the
    launch, trackers, run folder, resume point, quantization and disk space; then the tokenizer
    (cheap, and it decides whether prompts become chat messages) and the whole dataset, checked
    with the method's own checks, before anything heavy loads.
    """
    from . import dist, modeling
    from .terminal import check_trackers
    from .terminal import prepare as prepare_terminal

    started = time.time()
    module, ctx, data_cfg = checked_config(cfg)
    problem = dist.launch_problem(ctx.dist)
    if problem:
        raise AlignError(problem)
    dist.prepare(ctx.dist)
    check_trackers(ctx.args.get("report_to"))
    prepare_terminal(bool(cfg.get("quiet")), bool(cfg.get("verbose")))
    ctx.output_dir = output_dir = resolve_output_dir(cfg)
    lock_run_folder(output_dir)  # held already when preflight named the folder; a sweep's job here
    resume_from = check_run_folder(output_dir, cfg.get("resume"), ctx.peft_cfg)
    preflight_quant(ctx.quant_cfg, ctx.peft_cfg)
    check_free_space(output_dir, modeling.resolve_model_path(ctx.model_cfg), ctx.peft_cfg.method == "none")

    # The checks above imported the libraries (TRL's config class): freeze their objects and let the
    # cyclic collector run again, so the data, the models and training collect their own garbage.
    collector.resume()
    # The method's own checks (settings, rewards, the columns they read) too: as validate runs them.
    tokenizer, splits, problems = checked_run_data(module, ctx, data_cfg)
    if problems:
        more = (
            f" (and {len(problems) - 1} more: `align data validate` lists them)" if len(problems) > 1 else ""
        )
        raise AlignError(problems[0] + more)
    train_ds, eval_ds = splits.datasets()
    log.info("data: %d train rows, %d eval rows", len(train_ds), len(eval_ds) if eval_ds is not None else 0)
    ctx.tokenizer, ctx.train_dataset, ctx.eval_dataset = tokenizer, train_ds, eval_ds
    return RunPlan(cfg, module, ctx, data_cfg, output_dir, resume_from, started)


def build_trainer(plan: RunPlan, callbacks: list, loss_guard) -> Any:
    """The method's trainer (`module.build`), with align's callbacks, the loss guard and the progress display.

    Also seeds the run and starts metrics.jsonl (trimmed to the resumed checkpoint, or fresh).
    """
    from transformers import set_seed

    from .callbacks import MetricsFileCallback
    from .guard import checkpoint_step, trim_metrics
    from .terminal import install as show_progress  # one bar and compact eval lines (quiet/verbose)

    cfg, ctx, output_dir = plan.cfg, plan.ctx, plan.output_dir
    set_seed(int(cfg.seed))
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if int(os.environ.get("RANK", "0")) == 0:  # one writer per run folder (torchrun ranks share it)
        if plan.resume_from is not None:
            trim_metrics(metrics_path, checkpoint_step(plan.resume_from))
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)  # left by a run that died before its first checkpoint
    ctx.callbacks = [MetricsFileCallback(metrics_path), *callbacks]
    trainer = plan.module.build(ctx)
    handler = getattr(trainer, "callback_handler", None)
    for callback in ctx.callbacks if handler is not None else []:
        if callback not in handler.callbacks:  # a builder that did not pass ctx.callbacks on
            trainer.add_callback(callback)
    loss_guard.attach(trainer)
    show_progress(trainer, plan.summary_keys, bool(cfg.get("quiet")), bool(cfg.get("verbose")))
    return trainer


def run_trainer(plan: RunPlan, trainer: Any, stop, loss_guard) -> tuple[dict, dict]:
    """Trains (or resumes, or finishes a run stopped after its last step); returns the final
    evaluation's metrics and the collapse diagnosis. A diverged loss, a failed reward or a stop
    signal during training is raised as the one-line error or TrainingInterrupted."""
    from .callbacks import collapse_outcome
    from .guard import NonFiniteLoss
    from .rewards import RewardFailed

    resume_from, output_dir, args = plan.resume_from, plan.output_dir, plan.ctx.args
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
        close_progress_bars(trainer)
        raise AlignError(diverged(trainer, err.step, err.what, args, output_dir)) from None
    except RewardFailed as err:
        # Raised while scoring, before the step's update: the weights are the last step's.
        close_progress_bars(trainer)
        stopped = f" (a {signal.Signals(stop.signum).name} came during the call)" if stop.signum else ""
        raise AlignError(f"{err}{stopped}{save_state(trainer, output_dir)}") from None
    if loss_guard.bad is not None:
        step, key, value = loss_guard.bad
        raise AlignError(diverged(trainer, step, f"{key} became {value}", args, output_dir, saved=False))
    if stop.stopped_at is not None:
        raise TrainingInterrupted(interrupted_message(stop, output_dir), stop.signum)
    # PPO/GRPO: collapse signatures; after a stop on collapse, the last good checkpoint is loaded.
    diagnosis = collapse_outcome(trainer, output_dir)
    # A signal after the last step: skip the final evaluation, but save the finished model.
    final_eval = {}
    if plan.ctx.eval_dataset is not None and stop.signum is None:
        final_eval = evaluated_at_end(trainer) or trainer.evaluate()
    return final_eval, diagnosis


def write_run_folder(plan: RunPlan, trainer: Any, final_eval: dict, diagnosis: dict) -> dict:
    """The model (or adapter) and tokenizer at the run folder's root, so the folder itself is what
    `model.name_or_path=<run folder>` or from_pretrained(<run folder>) takes; then summary.json,
    the plots and the run card (rank 0). Returns the summary's metrics ({} on other ranks)."""
    from .callbacks import finite_or_none
    from .card import write_run_card  # ours replaces TRL's card (written at each checkpoint)
    from .data.convert import data_path

    cfg, ctx, output_dir = plan.cfg, plan.ctx, plan.output_dir
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return {}
    ctx.tokenizer.save_pretrained(output_dir)
    keys, name = plan.summary_keys, ctx.method["name"]
    metrics = summarize(trainer, keys, final_eval)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        # Strict JSON: an undefined metric (NaN) is null.
        strict = {k: finite_or_none(v) for k, v in metrics.items()}
        json.dump(
            {"method": name, "metrics": strict, **diagnosis}, f, indent=2, allow_nan=False, ensure_ascii=False
        )
    if cfg.get("plot", True):
        from .plot import plot_metrics

        curves = Path(output_dir) / "metrics.jsonl"
        plot_metrics(curves, Path(output_dir) / "training_curves.svg", keys)
        watched = getattr(plan.module, "DIAGNOSTIC_KEYS", None)
        if watched:  # PPO/GRPO: the collapse watch's curves
            plot_metrics(curves, Path(output_dir) / "diagnostics.svg", only=watched, max_panels=len(watched))
    eval_rows = len(ctx.eval_dataset) if ctx.eval_dataset is not None else 0
    sample = ctx.method.get("sample")
    write_run_card(
        output_dir, cfg, metrics, len(ctx.train_dataset), eval_rows, data_path(plan.data_cfg, sample)
    )
    print_summary(name, output_dir, metrics, keys, time.time() - plan.started)
    return metrics
