"""The real `align` entry point: help, config printing, a training run and a Hydra sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

ALIGN = shutil.which("align") or "align"


def align(*args, cwd=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([ALIGN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_help_lists_subcommands_without_importing_torch():
    out = align("--help")
    for word in ("train", "data validate", "version"):
        assert word in out.stdout
    code = (
        "import sys; from align_cli.cli import main; main(['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'hydra') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_train_help_shows_groups_and_cfg_job_prints_config():
    out = align("train", "--help")
    for group in ("method:", "model:", "data:", "peft:", "quant:", "reward:"):
        assert group in out.stdout
    assert "dpo, grpo, kto, ppo, rm, sft" in out.stdout
    cfg = align("train", "method=kto", "peft=lora", "method.args.beta=0.3", "--cfg", "job").stdout
    assert "name: kto" in cfg and "beta: 0.3" in cfg and "method: lora" in cfg


def test_train_runs_and_prints_summary(tmp_path):
    out = align(
        "train", "method=dpo", "method.args.max_steps=4", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert "align: dpo finished" in out.stdout
    assert "rewards/accuracies" in out.stdout and "rewards/margins" in out.stdout
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").exists() and (run / "model.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["metrics"]["global_step"] == 4


def test_multirun_makes_one_folder_per_value(tmp_path):
    out = align(
        "train",
        "-m",
        "method=dpo",
        "method.args.beta=0.1,0.5",
        "method.args.max_steps=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(runs) == 2, out.stdout
    betas = []
    for run in runs:
        assert (run / "summary.json").exists() and (run / "model.safetensors").exists()
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        betas.append(float(overrides.split("method.args.beta=")[1].split()[0]))
    assert betas == [0.1, 0.5]


def test_unknown_command_fails_with_one_line():
    out = align("trian", check=False)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "unknown command" in out.stderr
