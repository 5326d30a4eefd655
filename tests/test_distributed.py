"""Two-process DDP on the CPU (torchrun + gloo): gradients are synchronised, rank 0 writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Each rank trains with the overrides given as JSON and reports its world size, wrapped model
# type and a checksum of its final weights.
PROBE = """
import json, os, sys
from align_cli.testing import compose
from align_cli.train import train

r = train(compose(json.loads(sys.argv[2]), sys.argv[1]))
total = float(sum(p.double().sum() for p in r.trainer.model.parameters()))
info = {"rank": int(os.environ["RANK"]), "world": r.trainer.args.world_size,
        "wrapped": type(r.trainer.model_wrapped).__name__, "checksum": total}
print("RANKINFO", json.dumps(info))  # end_rank flushes it

from align_cli.dist import end_rank
end_rank()
"""


def trained_on_two_ranks(tmp_path, overrides: list[str]) -> list[dict]:
    """Trains into tmp_path/run with `torchrun --nproc_per_node 2`; each rank's report, checked
    to come from real DDP (two ranks, world size 2, a DistributedDataParallel wrapper)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(probe),
            str(tmp_path / "run"),
            json.dumps(overrides),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    infos = [
        json.loads(line.split("RANKINFO ", 1)[1]) for line in out.stdout.splitlines() if "RANKINFO" in line
    ]
    assert sorted(i["rank"] for i in infos) == [0, 1]
    assert all(i["world"] == 2 and i["wrapped"] == "DistributedDataParallel" for i in infos)
    return infos


def test_torchrun_two_processes_is_real_ddp(tmp_path):
    """GRPO-ptx on two ranks: each rank samples its own prompts and draws its own demonstrations
    (seeded by rank), so the ranks' weights stay identical only if the gradients of both losses,
    GRPO's and the ptx loss, are all-reduced."""
    from align_cli.config import SAMPLES_DIR

    overrides = ["method=grpo", "reward=length", "method.args.max_steps=2", "method.args.ptx_coef=1.0",
                 f"data.ptx_path={SAMPLES_DIR / 'harmless_sft.jsonl'}", "method.args.ptx_batch_size=2",
                 "method.args.max_completion_length=8", "data.eval_ratio=0"]  # fmt: skip
    infos = trained_on_two_ranks(tmp_path, overrides)
    assert infos[0]["checksum"] == infos[1]["checksum"]
    assert (tmp_path / "run" / "summary.json").exists()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ptx = [r["ptx_loss"] for r in logged if "ptx_loss" in r]
    assert ptx and all(v > 0 for v in ptx)


def test_torchrun_cli_ranks_share_one_run_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "align_cli.cli",
            "train",
            "method=sft",
            "method.args.max_steps=2",
            "data.eval_ratio=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "sft").iterdir())
    assert len(runs) == 1, runs
    assert json.loads((runs[0] / "summary.json").read_text())["metrics"]["global_step"] == 2
    assert out.stdout.count("align: sft finished") == 1  # only rank 0 reports


def test_ppo_under_torchrun_syncs_policy_and_critic_and_evaluates_one_prompt(tmp_path):
    """Two ranks: both networks end identical (DDP), and an eval set of one prompt (rank 1 has
    none) neither hangs nor loses the row."""
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "Say something kind."}) + "\n")
    overrides = ["method=ppo", "method.args.max_steps=2", "method.args.per_device_train_batch_size=4",
                 "method.args.num_mini_batches=1", "method.args.max_new_tokens=8", f"data.eval_path={eval_file}"]  # fmt: skip
    infos = trained_on_two_ranks(tmp_path, overrides)
    assert infos[0]["checksum"] == infos[1]["checksum"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(row["prompt"] == "Say something kind." for row in samples)
    assert len({row["step"] for row in samples}) == len(samples)  # one row per evaluation, written once
