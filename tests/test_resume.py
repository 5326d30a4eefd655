"""Nothing trained is lost: interrupt and resume, NaN stop, run folders never reused.

- A run interrupted by SIGINT at step k saves checkpoint-k; `resume=true` continues it and
  ends with the same weights as a run that was never interrupted (same seed, LoRA dropout
  on, an epoch boundary crossed after the resume point).
- A loss that becomes NaN stops the run naming the step, after saving the state that step
  started from (the optimizer never applies the NaN), which can be resumed.
- SIGTERM to a real `align train` process: checkpoint, exit 143, one line that says how to continue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from align_cli.errors import AlignError, TrainingInterrupted
from align_cli.preflight import prepare
from align_cli.testing import compose
from align_cli.train import train

ROOT = Path(__file__).resolve().parents[1]
# 54 sample rows in batches of 32: 2 steps an epoch, so the resumed steps 4-6 cross an epoch.
RUN = [
    "method=sft",
    "peft=lora",
    "peft.r=4",
    "peft.dropout=0.1",
    "data.eval_ratio=0",
    "method.args.max_steps=6",
    "method.args.per_device_train_batch_size=32",
    "plot=false",
]


class SignalAt(TrainerCallback):
    """Sends a signal to this process during step `step` (as Ctrl-C or `kill` would)."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class NanAt(TrainerCallback):
    """From step `step` on, the input embeddings are NaN, so the loss is (the weights stay finite)."""

    def __init__(self, step: int):
        self.step = step
        self.hooked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1 and not self.hooked:
            model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
            self.hooked = True


class InfGradAt(TrainerCallback):
    """From step `step` on, one weight's gradient is infinite while the loss stays finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            param = next(p for p in model.parameters() if p.requires_grad)
            param.register_hook(lambda grad: grad * float("inf"))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logged_steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = train(compose(RUN, tmp_path / "straight"))
    expected = weights(straight.trainer.model)

    run = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted) as info:
        train(compose(RUN, run), callbacks=[SignalAt(3)])
    assert info.value.exit_code == 130
    assert "stopped by SIGINT at step 3" in str(info.value) and "resume=true" in str(info.value)
    assert (run / "checkpoint-3" / "trainer_state.json").exists() and not (run / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resumed = train(compose([*RUN, "resume=true"], run))
    assert resumed.trainer.state.global_step == 6
    got = weights(resumed.trainer.model)
    assert got.keys() == expected.keys()
    lora = [n for n in got if "lora_" in n]
    assert lora and all(not torch.equal(got[n], 0 * got[n]) for n in lora if "lora_B" in n)  # trained
    for name, tensor in expected.items():
        if torch.cuda.is_available():  # some CUDA backward kernels accumulate in any order
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(got[name], tensor), name
    # Every step logged once, the first three by the interrupted run, the rest after resuming.
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["metrics"]["global_step"] == 6


def test_nan_loss_stops_naming_the_step_after_saving_the_state_before_it(tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(
        AlignError, match=r"loss became nan at step 3; saved the state it started from \(step 2\)"
    ):
        train(compose(RUN, run), callbacks=[NanAt(3)])
    checkpoint = run / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert not (run / "summary.json").exists() and not (run / "checkpoint-3").exists()
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())

    # The saved state is a real resume point: continue from it by path (without the NaN).
    resumed = train(compose([*RUN, f"resume={checkpoint}"], run))
    assert resumed.trainer.state.global_step == 6
    assert all(torch.isfinite(p).all() for p in resumed.trainer.model.parameters())


def test_infinite_gradients_never_reach_the_weights(tmp_path):
    run = tmp_path / "inf"
    with pytest.raises(AlignError, match=r"gradients became inf or nan at step 3; saved .*\(step 2\)"):
        train(compose(RUN, run), callbacks=[InfGradAt(3)])
    assert (run / "checkpoint-2" / "trainer_state.json").exists()


def test_gradient_check_without_the_trainers_norm():
    """Loops that compute no gradient norm of their own (e.g. PPO's) get the guard's own check."""
    from types import SimpleNamespace

    from align_cli.guard import LossGuard, NonFiniteLoss

    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    args, state = SimpleNamespace(fp16=False, device="cpu"), SimpleNamespace(global_step=4)
    guard = LossGuard()
    guard.on_pre_optimizer_step(args, state, None, model=model)  # finite: passes
    model.weight.grad[0, 1] = float("nan")
    with pytest.raises(NonFiniteLoss, match="gradients became inf or nan"):
        guard.on_pre_optimizer_step(args, state, None, model=model)
    guard._grad_norm = 1.0  # a norm the Trainer computed wins over recomputing it
    guard.on_pre_optimizer_step(args, state, None, model=model)
    guard._grad_norm = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteLoss):
        guard.on_pre_optimizer_step(args, state, None, model=model)


def test_absurd_learning_rate_diverges_and_stops(tmp_path):
    run = tmp_path / "lr"
    with pytest.raises(AlignError) as info:
        train(compose(["method=sft", "data.eval_ratio=0", "method.args.learning_rate=1e12"], run))
    message = str(info.value)
    assert "loss became nan at step 2" in message and "learning_rate (now 1e+12)" in message
    assert (run / "checkpoint-1").is_dir() and not (run / "summary.json").exists()


def test_an_unfinished_run_is_not_restarted_over(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(AlignError, match="holds checkpoints of an unfinished run .*resume=true"):
        train(compose(["method=sft"], run))


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    """Runs started in the same second get their own folders (mkdir is the lock)."""
    monkeypatch.chdir(tmp_path)
    frozen, strftime = time.localtime(), time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: strftime(fmt, t or frozen))
    dirs = [next(a for a in prepare(["method=dpo"]) if a.startswith("hydra.run.dir=")) for _ in range(3)]
    assert len(set(dirs)) == 3, dirs
    assert dirs[1] == dirs[0] + "_1" and dirs[2] == dirs[0] + "_2"
    assert all((tmp_path / d.split("=", 1)[1]).is_dir() for d in dirs)


def test_sigterm_to_a_real_process_checkpoints_and_exits_143(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    args = ["method=sft", "method.args.max_steps=100000", "method.args.per_device_train_batch_size=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align_cli.cli", "train", *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 90
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("align: stopped by SIGTERM at step "), last
    step = int(last.split("at step ")[1].split(";")[0])
    assert (run / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert f"continue with: align train {' '.join(args)} resume=true hydra.run.dir={run}" in last
    assert "Traceback" not in err
