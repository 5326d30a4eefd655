"""`align eval method=rm`: reward models on labelled data (pairwise accuracy and margin,
listwise Kendall tau and top-1, pointwise MSE, Pearson and Spearman), with the functions
training's evaluation uses (methods/rm_metrics.py).
"""

from __future__ import annotations

import json
import os

from .config import DataConfig
from .errors import AlignError


def _normalizer(path: str):
    """The score normalisation a pointwise reward model was trained with (none if it says nothing)."""
    from .methods.rm_losses import ScoreNormalizer

    for name in ("score_normalization.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            data = data.get("score_normalization", data) if name == "config.json" else data
            if isinstance(data, dict) and "method" in data:
                return ScoreNormalizer(str(data["method"]), float(data["shift"]), float(data["scale"]))
    return ScoreNormalizer()


def evaluate_reward_models(
    models: list[str],
    data_cfg: DataConfig,
    mode: str = "pairwise",
    sample: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Scores labelled data with reward models and computes training's evaluation metrics.

    Args:
        models: reward-model paths (`rm` run folders, full or LoRA, saved classifiers, hub ids).
        data_cfg: the data (`data.path`): pairs, scored rows or rankings, as method=rm reads them.
        mode: pairwise | pointwise | listwise (`method.mode`).
        sample: the data_samples/ file used when `data_cfg.path` is null.
        batch_size: rows per reward-model call.

    Returns:
        `{"kind": "rm", "mode", "data", "rows", "models": [{"model", "metrics"}]}` with the
        metrics of align_cli/methods/rm_metrics.py for the mode (the names training logs with
        an `eval_` prefix).

    Raises:
        AlignError: an unknown mode, a path that is no reward model, data that cannot be read.
    """
    import numpy as np
    import torch

    from .data.convert import read_and_convert
    from .data.holdout import prompt_key
    from .methods.rm import MODES
    from .methods.rm_metrics import PAD_RANK, listwise_metrics, pairwise_metrics, pointwise_metrics
    from .rewards.model import ModelReward

    if mode not in MODES:
        raise AlignError(f"method.mode={mode!r} is not valid: use one of {', '.join(MODES)}")
    if not models:
        raise AlignError("model.name_or_path names no reward model to evaluate")
    results, source, n_rows = [], None, 0
    for path in models:
        try:
            rm = ModelReward("model", path=path, batch_size=batch_size)
        except AlignError as err:  # it names the reward key; here the model is model.name_or_path
            raise AlignError(str(err).replace("reward.model.path", "model.name_or_path", 1)) from None
        rm.to("cuda" if torch.cuda.is_available() else "cpu")
        loaded = read_and_convert(data_cfg, MODES[mode], rm.tokenizer.chat_template is not None, sample)
        rows, source, n_rows = loaded.rows, loaded.source, len(loaded.rows)
        if not rows:
            raise AlignError(f"{loaded.source}: no rows to evaluate on")
        if mode == "pairwise":
            prompts = [r["prompt"] for r in rows]
            chosen = rm(prompts=prompts, completions=[r["chosen"] for r in rows])
            rejected = rm(prompts=prompts, completions=[r["rejected"] for r in rows])
            metrics = pairwise_metrics(np.stack([chosen, rejected], axis=1))
        elif mode == "pointwise":
            normalizer = _normalizer(rm.path if os.path.isdir(str(rm.path)) else "")
            rewards = rm(prompts=[r["prompt"] for r in rows], completions=[r["completion"] for r in rows])
            ids: dict[str, int] = {}
            groups = [ids.setdefault(prompt_key({"prompt": r["prompt"]}), len(ids)) for r in rows]
            targets = [normalizer(r["score"]) for r in rows]
            metrics = pointwise_metrics(rewards, targets, groups)
        else:
            sizes = [len(r["completions"]) for r in rows]
            flat_prompts = [r["prompt"] for r in rows for _ in r["completions"]]
            flat = rm(prompts=flat_prompts, completions=[c for r in rows for c in r["completions"]])
            k_max = max(sizes)
            rewards = np.zeros((len(rows), k_max))
            ranks = np.full((len(rows), k_max), PAD_RANK)
            start = 0
            for g, k in enumerate(sizes):  # completions are best first: rank = position
                rewards[g, :k] = flat[start : start + k]
                ranks[g, :k] = np.arange(k)
                start += k
            metrics = listwise_metrics(rewards, ranks)
        results.append({"model": path, "metrics": {k: float(v) for k, v in metrics.items()}})
    return {"kind": "rm", "mode": mode, "data": source, "rows": n_rows, "models": results}
