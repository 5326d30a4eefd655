"""The training curves of a run folder as a small standalone SVG (training_curves.svg, diagnostics.svg),
and the small-multiple line charts a sweep's report draws (sweep.py).

No plotting library: importing and drawing with matplotlib took about half a second at the end
of every run, for a picture this simple.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file ([] when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(
    metrics_path: Path,
    out_path: Path,
    priority: list[str] | None = None,
    max_panels: int = 6,
    only: list[str] | None = None,
) -> Path | None:
    """Plots logged scalar curves against the step: losses, then `priority` keys, then the rest
    (or, with `only`, just those keys that were logged, in that order)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    skip = {"step", "epoch", "learning_rate", "grad_norm", "total_flos"}
    keys: list[str] = []
    for rec in records:
        for key in rec:
            if key not in skip and not key.endswith(("_runtime", "_per_second")) and key not in keys:
                keys.append(key)
    if only is not None:
        keys = [k for k in only if k in keys][:max_panels]
    else:
        # The training loss, then the method's key metrics: what a reader looks for first.
        wanted = ["loss", *(priority or [])]
        order = {k: i for i, k in enumerate(keys)}
        keys = sorted(keys, key=lambda k: (wanted.index(k) if k in wanted else len(wanted), order[k]))[
            :max_panels
        ]
    if not keys:
        return None
    panels = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        panels.append((key, points))
    out_path.write_text(svg_panels(panels), encoding="utf-8")
    return out_path


def _ticks(lo: float, hi: float) -> list[float]:
    """About four round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / 4
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_panels(
    panels: list[tuple[str, list[tuple[float, float]]]],
    width: int = 300,
    height: int = 230,
    xlabel: str = "step",
) -> str:
    """Small-multiple line charts (one panel per metric, x = `xlabel`) as a standalone SVG document.

    Written by hand rather than with matplotlib (see the module docstring).
    """
    from html import escape

    left, right, top, bottom = 52, 12, 24, 34  # room for tick labels and the title
    pw, ph = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
        'font-family="sans-serif" font-size="10">',
        f'<rect width="{width * len(panels)}" height="{height}" fill="white"/>',
    ]
    y0 = top
    for i, (key, points) in enumerate(panels):
        x0 = i * width + left
        parts.append(
            f'<text x="{x0 + pw / 2}" y="15" text-anchor="middle" font-size="12">{escape(key)}</text>'
        )
        parts.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{x0 + pw / 2}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>')
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ylo, yhi = min(ys), max(ys)
        if yhi - ylo < 1e-12:  # a flat line: give it some room
            ylo, yhi = ylo - 0.5, yhi + 0.5
        pad = (yhi - ylo) * 0.05
        ylo, yhi = ylo - pad, yhi + pad

        def sx(x: float, xlo=xlo, xhi=xhi, x0=x0) -> float:
            return x0 + (x - xlo) / (xhi - xlo) * pw

        def sy(y: float, ylo=ylo, yhi=yhi) -> float:
            return y0 + ph - (y - ylo) / (yhi - ylo) * ph

        for t in _ticks(ylo, yhi):
            parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{x0 - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{t:.4g}</text>')
        for t in _ticks(xlo, xhi):
            parts.append(f'<text x="{sx(t):.1f}" y="{y0 + ph + 13}" text-anchor="middle">{t:g}</text>')
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        if len(points) < 30:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="#1f77b4"/>' for x, y in points]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
