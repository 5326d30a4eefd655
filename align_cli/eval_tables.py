"""`align eval`'s outputs: eval.json (strict JSON: NaN becomes null), the eval.md table (also
printed) and samples.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def json_number(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def strict_json(obj: Any) -> Any:
    """The result as strict JSON has it: NaN (an undefined metric) becomes null."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float):
        return json_number(obj)
    return obj


POLICY_COLUMNS = [
    ("reward_greedy", "reward (greedy)"),
    ("reward_sampled", "reward (sampled)"),
    ("win_rate_greedy", "win rate (greedy)"),
    ("win_rate_sampled", "win rate (sampled)"),
    ("kl_to_reference", "KL to ref"),
    ("length_greedy", "length (greedy)"),
    ("length_sampled", "length (sampled)"),
    ("distinct_1_greedy", "distinct-1 (greedy)"),
    ("distinct_2_greedy", "distinct-2 (greedy)"),
    ("distinct_1_sampled", "distinct-1 (sampled)"),
    ("distinct_2_sampled", "distinct-2 (sampled)"),
    ("identical_share_greedy", "identical (greedy)"),
    ("identical_share_sampled", "identical (sampled)"),
]


RM_COLUMNS = [
    ("accuracy", "accuracy"),
    ("margin", "margin"),
    ("kendall_tau", "Kendall tau"),
    ("top1_accuracy", "top-1"),
    ("mse", "MSE"),
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
]


def markdown_table(result: dict) -> str:
    """The result as a markdown table, one row per model (metrics that none has are left out)."""
    columns = POLICY_COLUMNS if result["kind"] == "policy" else RM_COLUMNS
    every = [m["metrics"] for m in result["models"]]
    shown = [(k, title) for k, title in columns if any(k in m for m in every)]
    # Each reward of a mix too; the rest (e.g. eos_rate) is in eval.json.
    extra = sorted({k for m in every for k in m if k.startswith("rewards/")})
    shown += [(k, k) for k in extra]
    lines = [
        "| model | " + " | ".join(title for _, title in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for entry in result["models"]:
        cells = []
        for key, _ in shown:
            value = entry["metrics"].get(key)
            cells.append(
                f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
            )
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str) -> str:
    """Writes eval.json and eval.md into `output_dir`; returns the table."""
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(result)
    with open(os.path.join(output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(strict_json(result), f, indent=2, ensure_ascii=False, allow_nan=False)
    header = f"# align eval: {result['kind']} on {result['data']} ({result['rows']} rows)\n\n"
    if result.get("reference"):
        header += f"Reference (win rate, KL): {result['reference']}\n\n"
    with open(os.path.join(output_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(header + table)
    return table
