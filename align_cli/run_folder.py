"""A run's folder: choosing one no other run uses (one per `torchrun` launch), refusing one
that is finished, unwritable, or unfinished without `resume`, locking it while the run lives,
disk space, checkpoints (finishing from the last one, saving the state a failed step started
from), the resume command, the summary, and removing a folder a run never used.

preflight.py and train.py call these; nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

from omegaconf import DictConfig

from . import config as schema
from .errors import AlignError

log = logging.getLogger("align")


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


def disk_error(err: OSError, output_dir: str) -> AlignError | None:
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
        f"then continue with: {resume_command(output_dir)})"
    )


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


def close_progress_bars(trainer) -> None:
    """Closes the training bar an exception left open, so it does not redraw after our message."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None and hasattr(bar, "close"):
                bar.close()
                setattr(callback, name, None)


def resume_command(output_dir: str) -> str:
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


def interrupted_message(stop, output_dir: str) -> str:
    name = signal.Signals(stop.signum).name
    return (
        f"stopped by {name} at step {stop.stopped_at}; saved {output_dir}/checkpoint-{stop.stopped_at}; "
        f"continue with: {resume_command(output_dir)}"
    )


def save_state(trainer, output_dir: str) -> str:
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


def diverged(trainer, step: int, what: str, args: dict, output_dir: str, saved: bool = True) -> str:
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
        where = save_state(trainer, output_dir)
    else:
        previous = last_checkpoint(output_dir)
        where = f"; the last checkpoint with finite weights is {previous}" if previous else "; nothing saved"
    lr = args.get("learning_rate", getattr(trainer.args, "learning_rate", None))
    lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
    return f"{what} at step {step}{where}: lower method.args.learning_rate (now {lr}) or check the data"


def remove_if_untouched(run_dir: str) -> bool:
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


def refuse_finished(folder: str, how: str) -> None:
    if os.path.exists(os.path.join(folder, "summary.json")):
        raise AlignError(
            f"{how}={folder} holds a finished run; choose another folder (to train it further, "
            f"start from it with model.name_or_path={folder})"
        )


def run_of_checkpoint(resume) -> str | None:
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


HELD: dict[str, int] = {}  # run folder -> the open lock file this process holds


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
    if folder in HELD:
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
    HELD[folder] = fd


def unlock_run_folder(folder: str) -> None:
    """Releases a folder taken by `lock_run_folder` (a sweep's job, when it ends)."""
    fd = HELD.pop(os.path.abspath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the file drops the flock
