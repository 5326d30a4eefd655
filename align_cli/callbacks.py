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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
