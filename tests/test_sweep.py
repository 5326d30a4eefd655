"""Sweeps: the results table of any multirun (grid, Optuna, submitit), and `align sweep report`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align_cli.config import SAMPLES_DIR
from align_cli.errors import AlignError
from align_cli.sweep import report

ONE_STEP = [
    "method=dpo",
    "method.args.max_steps=1",
    "method.args.per_device_train_batch_size=4",
    "plot=false",
]


def align(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "align_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def fake_job(sweep: Path, num: int, overrides: list[str], status: str | None, metrics: dict) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status is not None:
        record = {"job": num, "overrides": overrides, "status": status, "error": "", "seconds": 1.0,
                  "metrics": metrics, "run_dir": str(job)}  # fmt: skip
        (job / "job.json").write_text(json.dumps(record))


def test_report_sorts_marks_the_best_and_lists_unfinished_jobs(tmp_path):
    fake_job(tmp_path, 0, ["method=dpo", "method.args.beta=0.1"], "finished", {"eval_loss": 0.5, "acc": 0.7})
    fake_job(tmp_path, 1, ["method=dpo", "method.args.beta=0.3"], "finished", {"eval_loss": 0.4, "acc": 0.6})
    fake_job(tmp_path, 2, ["method=dpo", "method.args.beta=0.9"], "failed", {})
    fake_job(tmp_path, 3, ["method=dpo", "method.args.beta=2.0"], None, {})  # killed: no job.json

    result = report(tmp_path)  # default: eval_loss, minimized
    table = rows(tmp_path)
    assert [r["job"] for r in table] == ["1", "0", "2", "3"]
    assert [r["best"] for r in table] == ["*", "", "", ""]
    assert [r["status"] for r in table] == ["finished", "finished", "failed", "unfinished"]
    assert "method.args.beta" in table[0] and "method" not in table[0]  # only what was swept
    assert result["direction"] == "minimize" and result["best"]["job"] == 1

    report(tmp_path, metric="acc")  # auto: an accuracy is maximized
    assert [r["job"] for r in rows(tmp_path)][:2] == ["0", "1"]
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Sweep results: acc (maximize)") and "| * | 0 | finished | 0.1 |" in md
    svg = (tmp_path / "results.svg").read_text()
    assert "acc vs method.args.beta" in svg and svg.count("<circle") == 2  # finished jobs only


def test_report_refuses_a_folder_without_jobs(tmp_path):
    with pytest.raises(AlignError, match="holds no sweep jobs"):
        report(tmp_path)


def test_grid_sweep_through_the_entry_point_keeps_going_past_a_failed_job(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join((SAMPLES_DIR / "dpo.jsonl").read_text().splitlines(keepends=True)[:12]))
    paths = f"{SAMPLES_DIR / 'dpo.jsonl'},{small},{tmp_path / 'missing.jsonl'}"
    sweep = tmp_path / "sweep"
    out = align("train", "-m", *ONE_STEP, f"data.path={paths}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "1 job(s) of the sweep failed" in out.stderr.splitlines()[-1]

    table = rows(sweep)
    assert sorted(r["status"] for r in table) == ["failed", "finished", "finished"]
    failed = next(r for r in table if r["status"] == "failed")
    assert "missing.jsonl" in failed["error"] and "does not exist" in failed["error"]
    finished = [r for r in table if r["status"] == "finished"]
    losses = [float(r["eval_loss"]) for r in finished]
    assert losses == sorted(losses) and finished[0]["best"] == "*"
    assert {r["data.path"] for r in finished} == {str(SAMPLES_DIR / "dpo.jsonl"), str(small)}

    # A sweep killed half-way: its report is rebuilt from the job folders that exist.
    for name in ("results.csv", "results.md", "results.svg"):
        (sweep / name).unlink()
    killed = next(r for r in finished if r["best"] != "*")["job"]
    (sweep / killed / "job.json").unlink()
    out = align("sweep", "report", str(sweep), "metric=eval_rewards/margins", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "eval_rewards/margins (maximize)" in out.stdout and out.stdout.strip().splitlines()[-1].startswith(
        "best: job"
    )
    assert {r["job"]: r["status"] for r in rows(sweep)}[killed] == "unfinished"


def test_a_metric_no_run_reports_stops_the_sweep_with_one_line(tmp_path):
    out = align(
        "train",
        "-m",
        "sweep.metric=eval_nosuch",
        *ONE_STEP,
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("align: error: sweep.metric=eval_nosuch is not in this run's summary.json")
        and "eval_loss" in last
    )


@pytest.mark.skipif(not has("hydra_plugins.hydra_optuna_sweeper"), reason="pip install 'align-cli[sweep]'")
def test_optuna_sweep_maximizes_sweep_metric_and_a_stored_study_resumes(tmp_path):
    import optuna
    import yaml

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [
        "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=beta", "method.args.beta=interval(0.01,0.5)",
        "sweep.metric=eval_rewards/margins", *ONE_STEP,
    ]  # fmt: skip
    first = align(
        "train", "-m", *common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Directions: ['maximize']" in first.stdout + first.stderr  # sweep.direction auto -> Optuna's
    table = rows(tmp_path / "a")
    assert len(table) == 2 and all(r["status"] == "finished" for r in table)
    best = yaml.safe_load((tmp_path / "a" / "optimization_results.yaml").read_text())
    margins = [float(r["eval_rewards/margins"]) for r in table]
    assert best["best_value"] == pytest.approx(max(margins), rel=1e-5) and table[0]["best"] == "*"

    again = align(
        "train", "-m", *common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-2000:]
    study = optuna.load_study(study_name="beta", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


@pytest.mark.skipif(
    not has("hydra_plugins.hydra_submitit_launcher"), reason="pip install 'align-cli[cluster]'"
)
def test_submitit_local_runs_two_jobs_each_on_two_ddp_ranks(tmp_path):
    if shutil.which("torchrun") is None and not os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "torchrun")
    ):
        pytest.skip("torch.distributed is needed")
    sweep = tmp_path / "sweep"
    out = align(
        "train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
        *ONE_STEP, "method.args.beta=0.1,0.3", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = rows(sweep)
    assert sorted(r["method.args.beta"] for r in table) == ["0.1", "0.3"]
    assert all(r["status"] == "finished" for r in table)
    for job in ("0", "1"):
        record = json.loads((sweep / job / "job.json").read_text())
        assert record["world_size"] == 2, record  # each submitit task was one DDP rank
        assert (sweep / job / "model.safetensors").exists()
