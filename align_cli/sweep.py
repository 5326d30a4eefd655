"""What a sweep found: `results.csv`, `results.md` and `results.svg` in the sweep folder.

align train -m method=dpo method.args.beta=0.05,0.1,0.3 sweep.metric=eval_rewards/accuracies
align sweep report multirun/dpo/<time>          # rebuild the table (also of a sweep killed half-way)

Every job of a multirun (any sweeper, any launcher) leaves `job.json` in its own folder: its
overrides, status (finished / failed / interrupted, with the one-line error), wall time and the
metrics of its `summary.json`. The table is rebuilt from those files each time a job ends, so it
is current while the sweep runs, holds every job whatever happened to the others, and works the
same when jobs run in other processes or on other machines (submitit). A job folder without
`job.json` is one that is still running or was killed: it is listed as `unfinished`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import AlignError

JOB_FILE = "job.json"
DIRECTIONS = ("maximize", "minimize", "auto")


def default_metric(metric: str | None, direction: str) -> tuple[str, str]:
    """`sweep.metric` and `sweep.direction` with their defaults filled in.

    No metric: the evaluation loss (every method's trainer reports one when evaluation is on,
    else the last step's training loss is used at report time). `auto` direction: minimize a
    metric named like a loss or an error, maximize anything else.
    """
    metric = metric or "eval_loss"
    if direction not in DIRECTIONS:
        raise AlignError(f"sweep.direction={direction!r} is not valid: use maximize, minimize or auto")
    if direction == "auto":
        lowered = metric.lower()
        direction = (
            "minimize" if any(w in lowered for w in ("loss", "mse", "error", "perplexity")) else "maximize"
        )
    return metric, direction


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """The job's value of `metric` (finite), or None; `eval_loss` falls back to the last step's loss."""
    value = metrics.get(metric)
    if value is None and metric == "eval_loss":
        value = metrics.get("loss_last_step")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def write_job(job_dir: str, record: dict[str, Any]) -> None:
    """Writes a job's `job.json` (atomically: the report may be read by another job meanwhile)."""
    path = Path(job_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def job_record(
    job_dir: str, num: int, overrides: list[str], status: str, started: float, error: str = ""
) -> dict:
    """The `job.json` content of one finished, failed or interrupted job."""
    metrics: dict[str, Any] = {}
    summary = Path(job_dir) / "summary.json"
    if summary.exists():
        try:
            metrics = json.loads(summary.read_text(encoding="utf-8")).get("metrics", {})
        except (OSError, ValueError):
            pass
    return {
        "job": num,
        "overrides": list(overrides),
        "status": status,
        "error": " ".join(error.split()),
        "seconds": round(time.time() - started, 2),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),  # DDP ranks the job ran on
        "metrics": metrics,
        "run_dir": str(job_dir),
    }


def _jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for child in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        record_file = child / JOB_FILE
        if record_file.exists():
            try:
                jobs.append(json.loads(record_file.read_text(encoding="utf-8")))
                continue
            except (OSError, ValueError):
                pass
        overrides: list[str] = []
        saved = child / ".hydra" / "overrides.yaml"
        if saved.exists():
            from omegaconf import OmegaConf

            overrides = [str(o) for o in OmegaConf.load(saved)]
        num = int(child.name) if child.name.isdigit() else len(jobs)
        jobs.append(
            {"job": num, "overrides": overrides, "status": "unfinished", "error": "", "seconds": None,
             "metrics": {}, "run_dir": str(child)}
        )  # fmt: skip
    return jobs


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def _swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (all of them when there is one job)."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    for job in jobs:
        for override in job["overrides"]:
            key, value = _split(override)
            if key.startswith("hydra.") or key in ("hydra/sweeper", "hydra/launcher"):
                continue
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    swept = [k for k in order if len(values[k]) > 1 or len(jobs) == 1]
    return swept or order


def report(sweep_dir: str | Path, metric: str | None = None, direction: str = "auto") -> dict[str, Any]:
    """Rebuilds `results.csv`, `results.md` and `results.svg` from the job folders of a sweep.

    Args:
        sweep_dir: the multirun folder (`hydra.sweep.dir`).
        metric: the column to sort by (`sweep.metric`); None: the one the sweep was run with
            (from a job's saved config), else `eval_loss`.
        direction: maximize, minimize or auto.

    Returns:
        {"metric", "direction", "jobs" (rows, best first), "best" (the best row or None)}.

    Raises:
        AlignError: a folder that is not a sweep folder.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise AlignError(
            f"{sweep_dir} is not a folder: give the sweep folder (hydra.sweep.dir, under multirun/)"
        )
    jobs = _jobs(sweep_dir)
    if not jobs:
        raise AlignError(
            f"{sweep_dir} holds no sweep jobs (subfolders with .hydra/): give the folder a multirun made"
        )
    if metric is None:
        metric, direction = _saved_choice(jobs, direction)
    metric, direction = default_metric(metric, direction)
    for job in jobs:
        job["value"] = metric_value(job["metrics"], metric) if job["status"] == "finished" else None
    sign = -1.0 if direction == "maximize" else 1.0
    jobs.sort(key=lambda j: (j["value"] is None, sign * (j["value"] or 0.0), j["job"]))
    best = jobs[0] if jobs[0]["value"] is not None else None
    swept = _swept_keys(jobs)
    metric_keys = _metric_columns(jobs, metric)
    header = ["best", "job", "status", *swept, metric, *[k for k in metric_keys if k != metric],
              "seconds", "error", "run_dir"]  # fmt: skip
    rows = []
    for job in jobs:
        given = dict(_split(o) for o in job["overrides"])
        row = {
            "best": "*" if job is best else "",
            "job": job["job"],
            "status": job["status"],
            **{k: given.get(k, "") for k in swept},
            metric: _fmt(job["value"]),
            **{k: _fmt(job["metrics"].get(k)) for k in metric_keys if k != metric},
            "seconds": job["seconds"] if job["seconds"] is not None else "",
            "error": job["error"],
            "run_dir": job["run_dir"],
        }
        rows.append(row)
    _write_atomic(sweep_dir / "results.csv", _csv(header, rows))
    _write_atomic(sweep_dir / "results.md", _markdown(header, rows, metric, direction))
    svg = _plot(jobs, swept, metric)
    if svg:
        _write_atomic(sweep_dir / "results.svg", svg)
    return {"metric": metric, "direction": direction, "jobs": jobs, "best": best}


def _saved_choice(jobs: list[dict[str, Any]], direction: str) -> tuple[str | None, str]:
    """The sweep.metric/direction a job of this sweep was composed with, if any."""
    from omegaconf import OmegaConf

    for job in jobs:
        saved = Path(job["run_dir"]) / ".hydra" / "config.yaml"
        if saved.exists():
            sweep = OmegaConf.to_container(OmegaConf.load(saved)).get("sweep") or {}
            return sweep.get("metric"), sweep.get("direction", direction)
    return None, direction


def _metric_columns(jobs: list[dict[str, Any]], metric: str, limit: int = 8) -> list[str]:
    """The sorting metric, then the other metrics the jobs share (eval first), at most `limit`."""
    seen: list[str] = []
    for job in jobs:
        for key in job["metrics"]:
            if key.endswith(("_runtime", "_per_second", "num_tokens", "_entropy")):
                continue  # speed and bookkeeping: in summary.json, not what a sweep compares
            if key not in seen:
                seen.append(key)
    seen.sort(key=lambda k: (not k.startswith("eval_"), k == "global_step"))
    return [metric, *[k for k in seen if k != metric]][:limit]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _csv(header: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _markdown(header: list[str], rows: list[dict[str, Any]], metric: str, direction: str) -> str:
    shown = [h for h in header if h != "run_dir"]
    lines = [
        f"# Sweep results: {metric} ({direction}), best first",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = [str(row[h]).replace("|", "\\|") for h in shown]
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(1 for r in rows if r["status"] != "finished")
    lines += ["", f"{len(rows)} jobs, {len(rows) - failed} finished; run folders are in results.csv."]
    return "\n".join(lines) + "\n"


def _plot(jobs: list[dict[str, Any]], swept: list[str], metric: str) -> str | None:
    """One panel per swept key: the metric against that key's values (numeric or in order)."""
    from .plot import svg_panels

    panels = []
    for key in swept:
        points: list[tuple[float, float]] = []
        labels: list[str] = []
        for job in jobs:
            value = dict(_split(o) for o in job["overrides"]).get(key)
            if value is None or job["value"] is None:
                continue
            try:
                x = float(value)
            except ValueError:
                if value not in labels:
                    labels.append(value)
                x = float(labels.index(value))
            points.append((x, job["value"]))
        if points:
            title = f"{metric} vs {key}" + (
                f" ({', '.join(f'{i}={v}' for i, v in enumerate(labels))})" if labels else ""
            )
            panels.append((title, sorted(points)))
    return svg_panels(panels, xlabel="value") if panels else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    """`align sweep report <sweep folder> [metric=<name>] [direction=maximize|minimize]`."""
    import sys

    if not argv or argv[0] in ("-h", "--help") or argv[0] != "report" or len(argv) < 2:
        print(USAGE)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    folder, options = argv[1], dict(a.split("=", 1) for a in argv[2:] if "=" in a)
    unknown = [a for a in argv[2:] if "=" not in a or a.split("=", 1)[0] not in ("metric", "direction")]
    try:
        if unknown:
            raise AlignError(
                f"'{unknown[0]}' is not a sweep report option: use metric=<name> and direction=<...>"
            )
        result = report(folder, options.get("metric"), options.get("direction", "auto"))
    except AlignError as err:
        print(f"align: error: {err}", file=sys.stderr)
        sys.exit(1)
    print((Path(folder) / "results.md").read_text(encoding="utf-8"), end="")
    best = result["best"]
    print(f"best: job {best['job']} ({result['metric']}={best['value']:.6g}) -> {best['run_dir']}" if best
          else f"no finished job reported {result['metric']}")  # fmt: skip


USAGE = """usage: align sweep report <sweep folder> [metric=<name>] [direction=maximize|minimize]

Rebuilds results.csv, results.md and results.svg in a multirun folder from its jobs' folders
(also for a sweep that was killed half-way) and prints the table, best first.

example:
  align sweep report multirun/dpo/2026-12-01_10-00-00 metric=eval_rewards/accuracies
"""
