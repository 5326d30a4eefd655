"""`align pipeline`'s results: each stage's key metrics, the reward-model gate, and the
pipeline_summary.md / pipeline_summary.json written in the pipeline folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pipeline_plan import GATE_METRICS, Plan, Stage

SUMMARY_JSON, SUMMARY_MD = "pipeline_summary.json", "pipeline_summary.md"


@dataclass
class StageResult:
    name: str
    method: str
    folder: str
    status: str  # trained | resumed | kept
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    run: Any = None  # train()'s RunResult when the stage ran in this call


@dataclass
class PipelineResult:
    folder: str
    stages: list[StageResult]
    gate: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


def summary_metrics(folder: str) -> dict[str, float | None]:
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
        return json.load(f).get("metrics", {})


def key_metrics(method: str, metrics: dict) -> dict[str, float | None]:
    """The metrics a stage's method names as its key ones (plus its losses and steps)."""
    from .methods import load_method

    keys = getattr(load_method(method), "SUMMARY_KEYS", [])
    wanted = ["loss_first_step", "loss_last_step", *keys, "eval_loss", "global_step"]
    return {k: metrics[k] for k in dict.fromkeys(wanted) if k in metrics}


def gate_result(gate: dict, rm: Stage) -> dict[str, Any]:
    """The gate's figure for a finished reward-model stage: metric, value, threshold, passed."""
    metric = gate.get("metric") or "auto"
    if metric == "auto":
        metric = GATE_METRICS.get(str(rm.cfg.method.mode), "eval_accuracy")
    value = summary_metrics(rm.folder).get(metric)
    threshold = gate.get("min_accuracy")
    passed = threshold is None or (value is not None and value >= threshold)
    return {"stage": rm.name, "metric": metric, "value": value, "min_accuracy": threshold, "passed": passed}


def gate_message(result: dict, consumer: str) -> str:
    value = result["value"]
    rm = result["stage"]
    shown = "missing" if value is None else f"{value:.4g}"
    why = (
        f"{rm}/summary.json has no {result['metric']} (no held-out evaluation, or undefined)"
        if value is None
        else f"the reward model's held-out {result['metric']} is {shown}"
    )
    return (
        f"gate: {why}, below gate.min_accuracy={result['min_accuracy']}: stopped before {consumer}, which would "
        f"optimise a reward that does not rank answers reliably. Improve the reward model ({rm}.data.path, "
        f"{rm}.method.args.num_train_epochs, {rm}.method.args.learning_rate) and delete its folder to retrain it, "
        "or lower gate.min_accuracy"
    )


def _summary(p: Plan, results: list[StageResult], gate, evaluation, state: str, seconds: float) -> dict:
    return {
        "recipe": p.recipe,
        "folder": p.folder,
        "state": state,
        "seconds": round(seconds, 1),
        "stages": [
            {
                "name": r.name,
                "method": r.method,
                "folder": r.folder,
                "status": r.status,
                "seconds": round(r.seconds, 1),
                "metrics": r.metrics,
            }
            for r in results
        ],
        "gate": gate,
        "evaluation": evaluation,
    }


def render_summary(p: Plan, results: list[StageResult], gate, evaluation, state: str) -> str:
    """The markdown summary: one row per stage with its key metrics, the gate, the evaluation."""

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"# align pipeline: recipe={p.recipe} ({state})", "", f"Folder: `{p.folder}`", ""]
    lines += ["| stage | method | status | key metrics |", "|---|---|---|---|"]
    for r in results:
        shown = ", ".join(f"{k} {cell(v)}" for k, v in r.metrics.items())
        lines.append(f"| {r.name} | {r.method} | {r.status} | {shown} |")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines += [
            "",
            f"Gate: {gate['stage']} {gate['metric']} = {cell(gate['value'])} "
            f"(gate.min_accuracy {gate['min_accuracy']}): {verdict}",
        ]
    lines += [
        "",
        *_evaluation_table(evaluation),
    ]
    return "\n".join(lines) + "\n"


def _evaluation_table(evaluation: dict | None) -> list[str]:
    """The policies side by side: the few numbers that say whether the run aligned."""
    if not evaluation:
        return ["Evaluation: not run"]
    keys = ["reward_greedy", "reward_sampled", "win_rate_greedy", "kl_to_reference", "length_greedy",
            "distinct_2_sampled", "identical_share_greedy"]  # fmt: skip
    where = "held-out prompts" if evaluation.get("held_out") else "the last stage's prompts"
    lines = [f"## Evaluation ({evaluation.get('rows', '?')} {where}; details in eval/eval.md)", ""]
    lines += ["| policy | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, model in zip(evaluation.get("labels", []), evaluation["models"], strict=False):
        cells = []
        for key in keys:
            value = model["metrics"].get(key)
            cells.append("n/a" if not isinstance(value, (int, float)) or value != value else f"{value:.4g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_summary(p: Plan, results, gate, evaluation, state: str, seconds: float) -> None:
    from .callbacks import finite_or_none

    data = _summary(p, results, gate, evaluation, state, seconds)
    for stage in data["stages"]:
        stage["metrics"] = {k: finite_or_none(v) for k, v in stage["metrics"].items()}
    if data["evaluation"]:
        from .eval_tables import strict_json

        data["evaluation"] = strict_json(data["evaluation"])  # an undefined metric (NaN) is null
    Path(p.folder, SUMMARY_JSON).write_text(json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
    Path(p.folder, SUMMARY_MD).write_text(
        render_summary(p, results, gate, evaluation, state), encoding="utf-8"
    )
