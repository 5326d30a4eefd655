"""`method.args.report_to=tensorboard`: event files read back with tensorboard's own reader, for a TRL
trainer (DPO) and for our own PPO loop, whose metrics (KL, score, the RL diagnostics) must reach
the tracker too. The PPO run goes through the real entry point and also checks its model card."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("tensorboard")

from align_cli.testing import compose  # noqa: E402
from align_cli.train import train  # noqa: E402


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the tensorboard event files under `folder`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no tensorboard event file under {folder}"
    out: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_dpo_logs_to_tensorboard(tmp_path):
    cfg = compose(
        [
            "method=dpo",
            "method.args.max_steps=3",
            "method.args.report_to=tensorboard",
            "method.args.eval_steps=3",
        ],
        output_dir=tmp_path,
    )
    train(cfg)
    found = scalars(tmp_path / "runs")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert [round(v, 4) for _, v in sorted(found["train/loss"])] == [round(v, 4) for v in losses]
    assert {
        "train/rewards/accuracies",
        "train/rewards/margins",
        "eval/loss",
        "eval/rewards/accuracies",
    } <= set(found)


def test_ppo_logs_its_own_metrics_to_tensorboard_and_writes_a_card(tmp_path):
    run = tmp_path / "ppo"
    overrides = [
        "method=ppo",
        "method.args.max_steps=2",
        "method.args.report_to=tensorboard",
        "method.args.max_new_tokens=8",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "align_cli", "train", *overrides, f"hydra.run.dir={run}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = scalars(run / "runs")
    for tag in (
        "train/kl",
        "train/score",
        "train/loss",
        "train/policy_clipfrac",
        "train/rewards/length/mean",
        "eval/score",
    ):
        assert tag in found, f"{tag} not in {sorted(found)}"
    logged = {
        r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kl" in r
    }
    assert {step: round(v, 4) for step, v in found["train/kl"]} == {
        s: round(r["kl"], 4) for s, r in logged.items()
    }

    card = (run / "README.md").read_text()
    assert "PPO with a critic" in card and "| train | `" in card and "prompts.jsonl` |" in card
    # The command as run, with the reward the method defaults to made explicit.
    assert "align train reward=length " + " ".join(overrides) + "\n" in card
    assert "| `kl` |" in card and "| `reward.length.target` | 40 |" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ran = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, env=env
    )
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_a_tracker_without_its_package_is_one_line(monkeypatch):
    import importlib.util

    from align_cli.errors import AlignError
    from align_cli.terminal import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(AlignError, match="report_to=wandb needs the wandb package, which is not installed"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers("tensorboard")
    check_trackers("none")
