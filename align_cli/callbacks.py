"""Run-folder outputs shared by every method: metrics as JSON lines and a plot of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Appends every `trainer.log(...)` record to `metrics.jsonl` (one JSON object per line)."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[key] = value if math.isfinite(value) else str(value)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(
    metrics_path: Path, out_path: Path, priority: list[str] | None = None, max_panels: int = 6
) -> Path | None:
    """Plots logged scalar curves against the step: losses, then `priority` keys, then the rest."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    skip = {"step", "epoch", "learning_rate", "grad_norm", "total_flos"}
    keys: list[str] = []
    for rec in records:
        for key in rec:
            if key not in skip and not key.endswith(("_runtime", "_per_second")) and key not in keys:
                keys.append(key)
    # The training loss, then the method's key metrics: what a reader looks for first.
    wanted = ["loss", *(priority or [])]
    order = {k: i for i, k in enumerate(keys)}
    keys = sorted(keys, key=lambda k: (wanted.index(k) if k in wanted else len(wanted), order[k]))[
        :max_panels
    ]
    if not keys:
        return None
    # A bare Figure, not pyplot: no global backend switch or figure registry in the caller's
    # process, and fixed margins instead of tight_layout(), which renders the whole figure an
    # extra time just to measure it (a third of the plot's cost, paid at the end of every run).
    from matplotlib.figure import Figure

    n = len(keys)
    width, height = 3.2 * n, 2.8
    left, right, gap, bottom, top = 0.55, 0.15, 0.6, 0.45, 0.3  # inches: tick labels, title
    axes_width = (width - left - right - gap * (n - 1)) / n
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / axes_width,
    )
    for ax, key in zip(fig.subplots(1, n, squeeze=False)[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.savefig(out_path, dpi=100)
    return out_path
