"""The terminal during `align train`: one bar with the method's key numbers, evaluations as one line,
every record in metrics.jsonl and train.log; `-q` shows none of it, `verbose=true` every key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from align_cli.terminal import bar_keys, eval_line


def _train(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "align_cli",
            "train",
            "method=dpo",
            "method.args.max_steps=4",
            "method.args.eval_steps=2",
            *args,
            f"hydra.run.dir={run}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr, (run / "train.log").read_text()


def test_default_shows_one_bar_and_compact_eval_lines(tmp_path):
    shown, log = _train(tmp_path)
    assert "{'loss'" not in shown and "'eval_loss'" not in shown  # no per-step dicts
    assert "loss=" in shown and "rewards/accuracies=" in shown  # the bar's postfix
    evals = [line for line in shown.splitlines() if line.startswith("eval @ step")]
    assert [e.split(":")[0] for e in evals] == ["eval @ step 2", "eval @ step 4"], evals
    assert "| rewards/accuracies " in evals[0] and "logps" not in evals[0]
    assert "Tokenizing" not in shown and "Writing model shards" not in shown  # no other bars
    # The full records are in train.log: every key, once per logged step.
    records = [line for line in log.splitlines() if "[align.metrics]" in line]
    assert len([r for r in records if '"loss"' in r]) == 4 and all(
        '"logps/chosen"' in r for r in records if '"loss"' in r
    )
    assert len([r for r in records if '"eval_loss"' in r]) == 2


@pytest.mark.parametrize("setting", ["quiet=true", "verbose=true"])
def test_quiet_shows_no_progress_and_verbose_every_key(tmp_path, capfd, setting):
    from align_cli.testing import compose
    from align_cli.train import train

    steps = ["method.args.max_steps=2", "method.args.eval_steps=2"]
    train(compose(["method=dpo", *steps, setting], output_dir=tmp_path))
    out, err = capfd.readouterr()
    shown = out + err
    assert "align: dpo finished" in shown  # the summary always shows
    if setting == "quiet=true":
        assert "it/s" not in shown and "eval @" not in shown and "{'loss'" not in shown
    else:
        assert "{'loss'" in shown and "'logps/chosen'" in shown and "'eval_loss'" in shown


def test_bar_and_eval_line_pick_the_methods_numbers():
    assert bar_keys(["score", "kl", "non_score_reward", "eval_score"]) == ["loss", "score", "kl"]
    line = eval_line(
        7,
        {"eval_score": 0.51234, "eval_response_length": 8.0, "eval_eos_rate": 0.0},
        ["eval_loss", "eval_score"],
    )
    assert line == "eval @ step 7: score 0.5123"


def test_dash_q_is_quiet_true():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "align_cli", "train", "-q", "method=dpo", "--cfg", "job"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "quiet: true" in out.stdout, out.stderr[-2000:]
