"""Callbacks shared by every method: metrics as JSON lines (`MetricsFileCallback`) and the
collapse watch (`CollapseCallback`). The training-curve plot is in plot.py."""

from __future__ import annotations

import json
import math

from transformers import TrainerCallback

from .compat import load_checkpoint


def finite_or_none(value: float) -> float | None:
    """A metric as strict JSON has it: NaN and infinities (undefined metrics) become null."""
    return value if math.isfinite(value) else None


class MetricsFileCallback(TrainerCallback):
    """Appends every `trainer.log(...)` record to `metrics.jsonl` (one JSON object per line);
    an undefined value (NaN, inf) is null, so every line is strict JSON."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[key] = finite_or_none(value)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")


class CollapseCallback(TrainerCallback):
    """Watches PPO/GRPO's logged metrics for the collapse signatures of align_cli/diagnostics.py.

    Each signature found is printed once (`align: warning: collapse ...`) and kept for
    summary.json. With `stop` (`method.stop_on_collapse=true`) the first one stops training;
    until then a checkpoint is saved at every logging step whose record shows no signature (and
    none where one shows), so the last checkpoint before the collapse began is there to restore
    (`collapse_outcome`).

    Args:
        vocab_size: the policy's vocabulary size (the uniform entropy is log V).
        keys: which logged keys hold reward, entropy, KL, top-completion share and probe.
        settings: the thresholds (`method.collapse`).
        stop: stop training at the first collapse.
    """

    def __init__(self, vocab_size: int, keys, settings=None, stop: bool = False):
        from .diagnostics import CollapseSettings

        self.vocab_size = int(vocab_size)
        self.keys = keys
        self.settings = settings or CollapseSettings()
        self.stop = bool(stop)
        self.tracker = None  # a diagnostics.CollapseTracker from the first training record on
        self.found: list = []
        self.notes: list[str] = []
        self.stopped = None  # the Collapse that stopped training

    def _say(self, state, text: str, kind: str = "warning") -> None:
        if state.is_world_process_zero:
            import sys

            print(f"align: {kind}: {text}", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        from .diagnostics import CollapseTracker, start_notes

        if not logs or self.keys.reward not in logs:  # evaluation and end-of-training records
            return
        record = {"step": state.global_step, **logs}
        if self.tracker is None:  # the first training record: what the policy started as
            self.tracker = CollapseTracker(record, self.vocab_size, self.settings, self.keys)
            self.notes = start_notes(record, self.vocab_size, self.settings, self.keys)
            for note in self.notes:
                self._say(state, note, "note")
        for collapse in self.tracker.add(record):  # constant work per record, however long the run
            self.found.append(collapse)
            self._say(
                state, f"collapse at step {collapse.step} (since step {collapse.onset}): {collapse.message}"
            )
        if not self.stop:
            return
        if self.found:
            self.stopped = self.stopped or self.found[0]
            control.should_training_stop = True
            control.should_save = False  # the collapsed state is not worth a checkpoint
        else:
            # A checkpoint of every healthy logged step; none of a step that shows a signature.
            control.should_save = not self.tracker.shows_signature

    def summary(self) -> dict:
        """What summary.json says about collapse ({} when nothing was found)."""
        out: dict = {}
        if self.found:
            out["collapse"] = [c.as_dict() for c in self.found]
        if self.notes:
            out["diagnostic_notes"] = list(self.notes)
        return out


def _checkpoints_before(output_dir: str, step: int) -> list[tuple[int, str]]:
    import os
    import re

    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and int(match.group(1)) < step:
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def collapse_outcome(trainer, output_dir: str) -> dict:
    """After training: what the collapse watch found, for summary.json; after a stop on
    collapse, the last checkpoint from before the collapse began is loaded back into the
    trainer, so the model saved as the run's is that one.

    Returns:
        {} when the run has no `CollapseCallback` or it found nothing; else `collapse` (the
        signatures), and after a stop `stopped_on_collapse` (step, kind, message, restored).
    """
    handler = getattr(trainer, "callback_handler", None)
    watch = next((c for c in getattr(handler, "callbacks", []) if isinstance(c, CollapseCallback)), None)
    if watch is None:
        return {}
    out = watch.summary()
    collapse = watch.stopped
    if collapse is None:
        return out
    good = _checkpoints_before(output_dir, collapse.onset)
    restored = None
    if good:
        restored = good[-1][1]
        # transformers' own resume loader (our PPO trainer loads policy and critic in it).
        load_checkpoint(trainer, restored)
        where = f"the run's model is {restored}, the last checkpoint before it"
    else:
        where = "no checkpoint was saved before it began, so the run's model is the collapsed one"
    out["stopped_on_collapse"] = {**collapse.as_dict(), "restored": restored}
    if trainer.is_world_process_zero():
        import sys

        print(
            f"align: warning: stopped at step {collapse.step} (method.stop_on_collapse), {collapse.kind} since "
            f"step {collapse.onset}: {collapse.message}; {where}",
            file=sys.stderr,
            flush=True,
        )
    return out


def collapse_watch(method: dict, vocab_size: int, keys) -> CollapseCallback:
    """The `CollapseCallback` of a PPO/GRPO run from its checked method settings
    (`method.stop_on_collapse`, `method.collapse`: `methods.base.RolloutSettings`)."""
    from .diagnostics import CollapseSettings

    return CollapseCallback(
        vocab_size, keys, CollapseSettings(**method["collapse"]), method["stop_on_collapse"]
    )
