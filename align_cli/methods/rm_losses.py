"""The seed's three reward-model losses (section 2.2), as pure functions of reward tensors.

    pointwise (打分式):  L = E[(r(x, y) - s)^2]
    pairwise  (对比式):  L = -E[log σ(r(x, y+) - r(x, y-) - m)]          (m: optional margin, 0 by default;
                         computed by TRL's RewardTrainer, so not here)
    listwise  (排序式):  L = -E_x[ 1/C(K,2) · Σ_{i<j} log σ(r(x, y_i) - r(x, y_j)) ]
                         with y_1 ≻ y_2 ≻ ... ≻ y_K, the K responses of one prompt, best first

The listwise loss averages over the C(K,2) pairs of each prompt first and over prompts
second, as the seed's 1/C(K,2) factor says, so a prompt with many responses weighs as much
as a prompt with two. All K responses of a prompt are scored in the same forward pass
(InstructGPT's reason: spreading one prompt's pairs over batches overfits). K may differ
between the prompts of one batch; `ranked_pairs` builds the pair indices for that layout.

Score normalisation for the pointwise mode (`fit_normalizer`) is fitted on the training
split and applied unchanged to the evaluation split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import AlignError
from .rm import NORMALIZATIONS  # the names live with the settings that check them


def pointwise_loss(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the rewards and the (normalised) human scores.

    Args:
        rewards: (N,) one reward per (prompt, response).
        scores: (N,) the target scores, on the scale the model is trained to predict.
    """
    return F.mse_loss(rewards.float(), scores.float())


def ranked_pairs(group_sizes: Sequence[int], device: torch.device | str | None = None):
    """Every ordered (better, worse) pair inside each group of a flat, best-first layout.

    The responses of group g occupy `sum(group_sizes[:g]) ... + group_sizes[g] - 1` in the flat
    reward vector, best first, so in each pair the better index is the smaller one.

    Args:
        group_sizes: K_g for each of the G groups (every K_g ≥ 2).
        device: where the returned tensors live.

    Returns:
        (better, worse, weight): three (P,) tensors over the P = Σ C(K_g, 2) pairs; `weight` is
        1 / (G · C(K_g, 2)), so Σ weight · pair_loss is the mean over groups of the mean over
        each group's pairs.
    """
    better, worse, weight = [], [], []
    start = 0
    n_groups = len(group_sizes)
    for k in group_sizes:
        k = int(k)
        if k < 2:
            raise ValueError(f"a ranked group needs at least 2 responses, got {k}")
        n_pairs = k * (k - 1) // 2
        for i in range(k):
            for j in range(i + 1, k):
                better.append(start + i)
                worse.append(start + j)
                weight.append(1.0 / (n_groups * n_pairs))
        start += k
    return (
        torch.tensor(better, dtype=torch.long, device=device),
        torch.tensor(worse, dtype=torch.long, device=device),
        torch.tensor(weight, dtype=torch.float32, device=device),
    )


def listwise_loss(rewards: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    """The seed's ranking loss: per prompt, the mean over its C(K,2) pairs of −log σ(r_better − r_worse).

    Args:
        rewards: (N,) rewards, N = Σ K_g, each group's responses contiguous and best first.
        group_sizes: K_g per group.

    Returns:
        A scalar: the mean over groups of each group's mean pair loss.
    """
    better, worse, weight = ranked_pairs(group_sizes, rewards.device)
    pair_loss = -F.logsigmoid(rewards[better] - rewards[worse])  # (P,)
    return (pair_loss * weight.to(pair_loss.dtype)).sum()


# --------------------------------------------------------------------------------------
# Score normalisation (pointwise)


@dataclass(frozen=True)
class ScoreNormalizer:
    """An affine map s -> (s - shift) / scale, fitted on the training scores."""

    method: str = "none"
    shift: float = 0.0
    scale: float = 1.0

    def __call__(self, score: float) -> float:
        return (float(score) - self.shift) / self.scale

    def as_dict(self) -> dict[str, float | str]:
        """What is written into the saved model's config, so scores can be mapped back."""
        return {"method": self.method, "shift": self.shift, "scale": self.scale}


def fit_normalizer(scores: Sequence[float], method: str) -> ScoreNormalizer:
    """Fits `none`, `minmax` (to [0, 1]) or `zscore` (mean 0, std 1) on the training scores.

    Raises:
        AlignError: an unknown method, or scores that are all equal (nothing to learn from).
    """
    if method not in NORMALIZATIONS:
        raise AlignError(f"method.normalize={method!r} is not valid: use one of {', '.join(NORMALIZATIONS)}")
    values = [float(s) for s in scores]
    if not values:
        raise AlignError("pointwise reward model: the training split has no scores")
    lo, hi = min(values), max(values)
    if hi == lo:
        raise AlignError(
            f"pointwise reward model: every training score equals {lo}; the scores must differ to be learned"
        )
    if method == "none":
        return ScoreNormalizer()
    if method == "minmax":
        return ScoreNormalizer("minmax", lo, hi - lo)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population std
    return ScoreNormalizer("zscore", mean, std)
