"""Guards around every training run, whatever the method: nothing trained is lost.

- `GracefulStop`: SIGINT/SIGTERM finish the current optimizer step, save a checkpoint and
  stop training; `align` then exits 130 (SIGINT) or 143 (SIGTERM). A second signal stops at
  once, without saving.
- `LossGuard`: a training loss (or gradient) that is NaN or infinite stops the run before the
  optimizer applies it; the state the step started from is saved as a checkpoint and the
  error names the step.
- `find_checkpoint` / `last_checkpoint`: what `resume=true` or `resume=<path>` continues from.

Both guards are transformers `TrainerCallback`s (the loss guard also wraps the trainer's
`training_step`), so they work for every method: each builds a `transformers.Trainer` subclass.
Under torch.distributed every rank takes the same decision at the same step (a tiny
all-reduce), so no rank waits forever in a collective the others left.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from .compat import observe_grad_norm
from .errors import AlignError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _all_ranks_max(value: float, device) -> float:
    """The maximum of `value` over all ranks (the value itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class GracefulStop(TrainerCallback):
    """Turns SIGINT/SIGTERM into "save a checkpoint at the end of this step, then stop".

    `install()` / `uninstall()` set and restore the signal handlers (main thread only: Python
    delivers signals there). `signum` is the signal received, `stopped_at` the step whose
    checkpoint was saved.
    """

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Second signal: the user does not want to wait. Restore the default behaviour and
            # deliver it again (SIGINT raises KeyboardInterrupt, SIGTERM ends the process).
            self.uninstall()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # os.write, not print: a signal can land while the main thread is inside a print to the
        # same stream (progress bars), and the buffered writer is not reentrant.
        name = signal.Signals(signum).name
        os.write(
            2,
            f"\nalign: {name} received: saving a checkpoint at the end of this step "
            f"(send it again to stop without saving)\n".encode(),
        )

    def on_step_end(self, args, state, control, **kwargs):
        received = int(_all_ranks_max(self.signum or 0, args.device))
        if received:
            self.signum = received  # another rank may have got it first
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class StickyInterrupt:
    """Makes Ctrl-C (SIGINT) before training stop the run even when library code swallows it.

    `datasets` hashes transforms inside a bare `except:` (fingerprinting), so a
    KeyboardInterrupt raised there is lost and preparation goes on. Inside this context a
    SIGINT still raises KeyboardInterrupt at once, and is remembered: leaving the block raises
    it again if it did not get out by itself.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.received and exc_type is None:
            raise KeyboardInterrupt  # it was swallowed somewhere inside
        return False


class NonFiniteLoss(Exception):
    """Raised from inside the training loop when the loss, gradients or outputs are NaN or infinite.

    Attributes:
        step: the step that failed (the optimizer has not applied it).
        what: what became non-finite, e.g. "loss became nan".
    """

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step = step
        self.what = what


# torch's complaint when sampling from NaN/inf probabilities (GRPO/PPO generate before the loss).
_NON_FINITE_ERROR = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


class LossGuard(TrainerCallback):
    """Stops training on a NaN or infinite loss or gradient, before the optimizer applies it.

    `attach(trainer)` wraps `trainer.training_step` (it returns the micro-batch loss, after the
    backward pass and before the optimizer step): a non-finite loss raises `NonFiniteLoss`,
    which leaves the model and optimizer as they were after the previous step. transformers
    would otherwise replace the NaN by an average in the logs (`logging_nan_inf_filter`) and
    step anyway. A finite loss can still have overflowing gradients: `on_pre_optimizer_step`
    checks them too (except under fp16, whose grad scaler skips such steps by design). Methods
    that generate first (GRPO) fail inside generation when the weights have blown up; that
    error is reported the same way. Trainers with their own loop that never calls
    `training_step` are still covered by `on_log`: a logged training loss that is not finite
    stops them (after the fact).
    """

    def __init__(self):
        self.bad: tuple[int, str, float] | None = None  # (step, key, value) seen by on_log
        self._grad_norm = None  # the norm the Trainer computed for the coming optimizer step

    def attach(self, trainer) -> None:
        original = getattr(trainer, "training_step", None)
        if original is None:
            return

        def training_step(*args, **kwargs):
            step = trainer.state.global_step + 1
            try:
                loss = original(*args, **kwargs)
            except RuntimeError as err:
                if _NON_FINITE_ERROR.search(str(err)):
                    first = str(err).strip().splitlines()[0]
                    raise NonFiniteLoss(step, f"the model's outputs became inf or nan ({first})") from err
                raise
            if isinstance(loss, torch.Tensor):
                finite = bool(torch.isfinite(loss.detach()).all())
                if _all_ranks_max(0.0 if finite else 1.0, loss.device):
                    value = loss.detach().float().mean().item() if not finite else math.nan
                    raise NonFiniteLoss(step, f"loss became {value}")
            return loss

        trainer.training_step = training_step  # an instance attribute shadows the method

        # The total gradient norm the Trainer computes before every optimizer step (to clip and
        # log it): keeping that value spares a second pass over the gradients.
        observe_grad_norm(trainer, self._record_grad_norm)

    def _record_grad_norm(self, norm) -> None:
        self._grad_norm = norm

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm, self._grad_norm = self._grad_norm, None
        if model is None or getattr(args, "fp16", False):
            return control
        if norm is not None:
            try:
                finite = math.isfinite(float(norm))
            except (TypeError, ValueError, RuntimeError):
                finite = None
            if finite is not None:
                if _all_ranks_max(0.0 if finite else 1.0, args.device):
                    raise NonFiniteLoss(state.global_step + 1, "gradients became inf or nan")
                return control
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:  # DeepSpeed keeps its own gradients
            return control
        try:
            device = grads[0].device
            # The total norm is inf/nan iff some element is; computed in grouped kernels
            # (get_total_norm, torch 2.6+) with a single sync, ~4x cheaper than a norm per tensor.
            if hasattr(torch.nn.utils, "get_total_norm"):
                total = torch.nn.utils.get_total_norm([g.detach() for g in grads]).to(device)
            else:
                total = torch.stack([g.detach().float().norm().to(device) for g in grads]).norm()
            finite = bool(torch.isfinite(total))
        except (RuntimeError, TypeError, NotImplementedError):  # sharded gradients (FSDP): skip
            return control
        if _all_ranks_max(0.0 if finite else 1.0, device):
            raise NonFiniteLoss(state.global_step + 1, "gradients became inf or nan")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if (
                "loss" in key
                and not key.startswith(("eval", "test"))
                and isinstance(value, float)
                and not math.isfinite(value)
            ):
                self.bad = (state.global_step, key, value)
                control.should_training_stop = True
        return control


def params_finite(model) -> bool:
    """Whether every parameter is finite (a NaN step may already have reached the weights)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# What a checkpoint folder holds for its weights: a full model, a LoRA adapter (either sharded).
_WEIGHTS = {
    "full": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "lora": ("adapter_model.safetensors", "adapter_model.bin"),
}
PPO_STATE_NAME = "ppo_state.json"  # written by our PPO trainer (the KL controller)
PPO_CRITIC_DIR = "critic"


def checkpoint_kind(folder: str | os.PathLike) -> str | None:
    """ "full" or "lora": what kind of weights a checkpoint holds (None: none at all)."""
    for kind, names in _WEIGHTS.items():
        if any((Path(folder) / n).is_file() for n in names):
            return kind
    if any(Path(folder).glob("pytorch_model_fsdp*")):  # FSDP's sharded full model
        return "full"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete.

    Complete means everything resuming reads: `trainer_state.json` that parses, the weights
    (readable safetensors headers), `optimizer.pt` and `scheduler.pt` (else training would
    go on with a fresh optimizer state, silently), and for PPO `ppo_state.json` and the critic.
    """
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (saving was cut short)"
    try:
        with open(state, encoding="utf-8") as f:
            int(json.load(f)["global_step"])
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is damaged (not valid JSON with a global_step)"
    if checkpoint_kind(folder) is None:
        return "no model or adapter weights"
    from .errors import AlignError
    from .model_checks import check_weight_files

    try:
        check_weight_files(str(folder))
    except AlignError as err:
        return str(err)
    # DeepSpeed and FSDP keep the optimizer in their own layouts (global_step*/, optimizer_0/).
    # FSDP with a full state dict: pytorch_model_fsdp*.bin and optimizer.bin (accelerate's names);
    # our PPO loop keeps its weights in model.safetensors (or the adapter) and critic/ instead.
    fsdp_model = any(folder.glob("pytorch_model_fsdp*")) or (folder / PPO_CRITIC_DIR).is_dir()
    engine_state = (
        any(folder.glob("global_step*"))
        or any(folder.glob("optimizer_*"))
        or (fsdp_model and (folder / "optimizer.bin").is_file())
    )
    if not engine_state:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (folder / name).is_file():
                return f"no {name} (resuming would restart the optimizer from scratch)"
    critic = folder / PPO_CRITIC_DIR
    if critic.is_dir() or (folder / PPO_STATE_NAME).exists():  # a PPO checkpoint
        if checkpoint_kind(critic) is None:
            return f"no critic weights in {PPO_CRITIC_DIR}/"
        try:
            with open(folder / PPO_STATE_NAME, encoding="utf-8") as f:
                json.load(f)["kl_controller"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"no readable {PPO_STATE_NAME} (the KL controller's state)"
    return None


def scan_checkpoints(run_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-<step>` folder of a run (or None), and the newer ones
    skipped as incomplete, each with why (newest first)."""
    run = Path(run_dir)
    if not run.is_dir():
        return None, []
    found = sorted(
        ((int(m.group(1)), child) for child in run.iterdir() if (m := CHECKPOINT_RE.match(child.name))),
        reverse=True,
    )
    skipped = []
    for _, child in found:
        problem = checkpoint_problem(child)
        if problem is None:
            return str(child), skipped
        skipped.append((str(child), problem))
    return None, skipped


def last_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The highest `checkpoint-<step>` folder that was saved completely (see `checkpoint_problem`), or None."""
    return scan_checkpoints(run_dir)[0]


def _say_skipped(skipped: list[tuple[str, str]], chosen: str | None) -> None:
    import sys

    for folder, problem in skipped:
        then = f"resuming from {os.path.basename(chosen)}" if chosen else "no complete checkpoint is left"
        print(
            f"align: warning: {folder} is incomplete ({problem}); {then}",
            file=sys.stderr,
            flush=True,
        )


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def find_checkpoint(resume, output_dir: str) -> str | None:
    """What `resume=` continues from: None (start fresh), or a complete checkpoint folder.

    A run folder's newer checkpoints that are incomplete (a truncated trainer_state.json,
    missing weights or optimizer state) are skipped, with a warning naming each and the one
    used; a checkpoint named directly must be complete.

    Args:
        resume: false/None, true (the last checkpoint of `output_dir`), or a path: a
            checkpoint folder, or a run folder (its last checkpoint).
        output_dir: this run's folder.

    Raises:
        AlignError: nothing to resume from, naming what was looked at and what would work.
    """
    if resume is None or resume is False or str(resume).strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if resume is True or str(resume).strip().lower() in ("true", "yes", "1", "last"):
        found, skipped = scan_checkpoints(output_dir)
        _say_skipped(skipped, found)
        if found is None:
            raise AlignError(
                f"resume=true: {output_dir} holds no complete checkpoint-<step> folder; name the run to "
                "continue with hydra.run.dir=<run folder> (or output_dir=<run folder>), or pass "
                "resume=<checkpoint folder>"
            )
        return found
    path = os.path.expanduser(str(resume))
    if CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))) or os.path.isfile(
        os.path.join(path, "trainer_state.json")
    ):
        if not os.path.exists(path):
            raise AlignError(f"resume={resume}: no such folder")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        newest = last_checkpoint(os.path.dirname(os.path.abspath(path)))
        hint = f"; resume from {newest} instead" if newest else ""
        raise AlignError(f"resume={resume}: this checkpoint is incomplete ({problem}){hint}")
    found, skipped = scan_checkpoints(path)
    if found is not None:  # a run folder: its last complete checkpoint
        _say_skipped(skipped, found)
        return found
    if not os.path.exists(path):
        raise AlignError(f"resume={resume}: no such folder")
    if skipped:
        raise AlignError(f"resume={resume}: no complete checkpoint ({skipped[0][0]}: {skipped[0][1]})")
    raise AlignError(
        f"resume={resume}: not a checkpoint (no trainer_state.json) and holds no checkpoint-<step> folder"
    )


def write_json_atomic(path: str | os.PathLike, data, **kwargs) -> None:
    """Writes JSON to a temporary file beside `path` and renames it over `path`: a reader (a
    resumed run) sees the old file or the new one, never half of one."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def trim_metrics(path: str, step: int) -> None:
    """Drops metrics.jsonl records logged after `step`: the resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    # The interrupted segment's end-of-training record (train_runtime...) goes too.
    kept = [
        line
        for line in lines
        if json.loads(line).get("step", 0) <= step and "train_runtime" not in json.loads(line)
    ]
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
