"""What `align train` shows on the terminal: one progress bar with the few numbers that matter for
the method, each evaluation as one compact line, and nothing else per step.

transformers' ProgressCallback prints every logging step as a 15-key Python dict between the
lines of a second (evaluation) bar. Every record is kept anyway: in `metrics.jsonl` (see
callbacks.MetricsFileCallback) and, as one line per record, in Hydra's `train.log`.

`quiet=true` (or `align train -q`): no bar, no evaluation lines, no info logs on the console
(warnings, errors and the final summary still show). `verbose=true`: transformers' own display,
every key of every record.
"""

from __future__ import annotations

import json
import logging
import math

from transformers import ProgressCallback

# Records that are not progress: the trainer's end-of-training speed report.
_SKIP = ("train_runtime", "total_flos")
_BAR_KEYS = 3  # loss and the method's first two training metrics
_EVAL_KEYS = 4


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def bar_keys(summary_keys: list[str]) -> list[str]:
    """The keys the bar shows: the loss and the method's first training metrics."""
    return ["loss", *[k for k in summary_keys if not k.startswith("eval_") and k != "loss"]][:_BAR_KEYS]


def eval_keys(summary_keys: list[str]) -> list[str]:
    return ["eval_loss", *[k for k in summary_keys if k.startswith("eval_") and k != "eval_loss"]]


def eval_line(step: int, logs: dict, keys: list[str]) -> str:
    """`eval @ step 3: loss 0.6816 | rewards/accuracies 1 | ...` (the method's eval metrics present)."""
    shown = [k for k in keys if k in logs][:_EVAL_KEYS]
    if not shown:  # a method whose eval keys are all its own: the first few numbers
        shown = [k for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))][
            :_EVAL_KEYS
        ]
    parts = [f"{k.removeprefix('eval_')} {_fmt(logs[k])}" for k in shown]
    return f"eval @ step {step}: " + " | ".join(parts)


def to_log_file(step: int, logs: dict) -> None:
    """Writes a record to the log files of the root logger only (Hydra's train.log), not the console."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        return
    values = {k: v for k, v in logs.items() if isinstance(v, (int, float, str)) and k != "total_flos"}
    record = logging.LogRecord(
        "align.metrics", logging.INFO, __file__, 0, f"step {step}: {json.dumps(values)}", None, None
    )
    for handler in handlers:
        handler.handle(record)


class TerminalProgress(ProgressCallback):
    """One training bar whose postfix holds the method's key numbers; evaluations as one line."""

    def __init__(self, summary_keys: list[str]):
        super().__init__()
        self.bar_keys = bar_keys(summary_keys)
        self.eval_keys = eval_keys(summary_keys)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return  # no second bar: an evaluation is short, and its result is one line

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        to_log_file(state.global_step, logs)
        if self.training_bar is None or any(k in logs for k in _SKIP):
            return
        if any(k.startswith("eval_") for k in logs):
            self.training_bar.write(eval_line(state.global_step, logs, self.eval_keys))
            return
        shown = {k: _fmt(logs[k]) for k in self.bar_keys if k in logs}
        if shown:
            self.training_bar.set_postfix(shown, refresh=True)


class LogFileOnly(ProgressCallback):
    """`quiet=true`: no display at all; records still reach train.log."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        return

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            to_log_file(state.global_step, logs)

    def on_train_end(self, args, state, control, **kwargs):
        return


def install(trainer, summary_keys: list[str], quiet: bool = False, verbose: bool = False) -> None:
    """Replaces transformers' progress display on `trainer` (any Trainer, our PPO's too).

    Args:
        trainer: the built trainer.
        summary_keys: the method's SUMMARY_KEYS (which numbers matter).
        quiet: no display; info logs off the console.
        verbose: keep transformers' display (every key of every record).
    """
    from transformers import PrinterCallback

    handler = getattr(trainer, "callback_handler", None)
    if handler is None or verbose:
        return
    for cls in (ProgressCallback, PrinterCallback):
        for callback in [c for c in handler.callbacks if type(c) is cls]:
            trainer.remove_callback(callback)
    # method.args.disable_tqdm=true asks for no bar, as quiet does.
    quiet = quiet or bool(getattr(getattr(trainer, "args", None), "disable_tqdm", False))
    trainer.add_callback(LogFileOnly() if quiet else TerminalProgress(summary_keys))


# report_to name -> the packages transformers' integration can use (any one of them).
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
}


def check_trackers(report_to) -> None:
    """Raises a one-line AlignError for a `method.args.report_to` tracker whose package is missing
    (transformers would stop with a traceback when it builds the trainer)."""
    import importlib.util

    from .errors import AlignError

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        packages = TRACKER_PACKAGES.get(str(name))
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise AlignError(
                f"method.args.report_to={name} needs the {packages[0]} package, which is not installed: "
                f"pip install {packages[0]} (or drop report_to)"
            )


def prepare(quiet: bool = False, verbose: bool = False) -> None:
    """Before anything is loaded: no bars but ours. Loading weights, each dataset pass TRL makes
    (tokenizing, truncating, ...) and each checkpoint written draw a bar of their own otherwise.
    `quiet` also keeps info logs off the console (train.log still gets them)."""
    if verbose:
        return
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if quiet:
        import sys

        for h in logging.getLogger().handlers:
            # The console only: not train.log, nor a handler that captures logs (pytest's caplog).
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (
                sys.stdout,
                sys.stderr,
            ):
                h.setLevel(logging.WARNING)
