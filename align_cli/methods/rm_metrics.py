"""Held-out metrics for reward models, computed over the whole evaluation split (numpy only).

Every mode reports the pairwise `accuracy` (how often the better response of a pair gets the
higher reward) and the mean `margin` (reward of the better minus reward of the worse) on the
pairs its data implies:

- pairwise: each (chosen, rejected) row;
- pointwise: every two evaluation rows of the same prompt whose scores differ (rows of
  different prompts are not compared: a 0.8 for one question does not make its answer better
  than a 0.6 for another); when no prompt has two such rows, there is no accuracy or margin;
- listwise: the C(K,2) ordered pairs inside each prompt's ranking.

Pointwise adds `mse` (on the normalised scale the model is trained on), `pearson` and
`spearman` over all rows; listwise adds `kendall_tau` (tau-b per prompt, averaged over
prompts) and `top1_accuracy` (the best response gets the highest reward). Undefined
correlations (a constant vector) are NaN, as in scipy (summary.json writes them as null).
"""

from __future__ import annotations

import numpy as np

# Rows of the padded (G, K_max) listwise arrays beyond a prompt's K carry this rank; it is the
# value transformers pads with when it concatenates evaluation batches of different widths.
PAD_RANK = -100


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of the 1-based ranks s+1 .. e
    return ranks


def pearson(x, y) -> float:
    """Pearson's correlation coefficient (NaN when either vector is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's on tie-averaged ranks."""
    return pearson(_rankdata(x), _rankdata(y))


def kendall_tau(x, y) -> float:
    """Kendall's tau-b, which corrects for ties in either vector (scipy.stats.kendalltau's default)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordant_minus_discordant = (sx * sy).sum()
    # tau-b's denominator: pairs untied in x times pairs untied in y.
    denom = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
    return float(concordant_minus_discordant / denom) if denom > 0 else float("nan")


def pair_accuracy_margin(rewards, targets, groups=None, chunk: int = 2048) -> tuple[float, float, int]:
    """Accuracy and mean margin over every pair (i, j) with targets[i] > targets[j] in one group.

    O(N²) comparisons done a block of rows at a time, so memory stays at chunk × N.

    Args:
        rewards: (N,) predicted rewards.
        targets: (N,) target scores.
        groups: (N,) a group id per row (the prompt); None: all rows are one group.

    Returns:
        (accuracy, mean margin r_i − r_j, number of pairs); NaN, NaN, 0 when no pair differs.
    """
    r, t = np.asarray(rewards, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    g = np.zeros(len(r), dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    correct, margin_sum, n_pairs = 0, 0.0, 0
    for start in range(0, len(r), chunk):
        rb, tb, gb = (a[start : start + chunk, None] for a in (r, t, g))  # (c, 1)
        better = (tb > t[None, :]) & (gb == g[None, :])  # (c, N): row i is better than column j
        diff = rb - r[None, :]  # (c, N)
        correct += int((diff[better] > 0).sum())
        margin_sum += float(diff[better].sum())
        n_pairs += int(better.sum())
    if n_pairs == 0:
        return float("nan"), float("nan"), 0
    return correct / n_pairs, margin_sum / n_pairs, n_pairs


def pointwise_metrics(rewards, scores, groups=None) -> dict[str, float]:
    """MSE, Pearson, Spearman, and pair accuracy/margin within prompts.

    Args:
        rewards: (N,) predicted rewards.
        scores: (N,) target scores on the same (normalised) scale.
        groups: (N,) the prompt of each row as an id; None compares every two rows.

    Returns:
        `mse`, `pearson`, `spearman`, and `accuracy`, `margin` when some prompt has two rows
        with different scores (left out otherwise, rather than NaN).
    """
    r, s = np.asarray(rewards, dtype=np.float64).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    accuracy, margin, n_pairs = pair_accuracy_margin(r, s, groups)
    pairs = {"accuracy": accuracy, "margin": margin} if n_pairs else {}
    return {
        **pairs,
        "mse": float(((r - s) ** 2).mean()),
        "pearson": pearson(r, s),
        "spearman": spearman(r, s),
    }


def pairwise_metrics(rewards) -> dict[str, float]:
    """Accuracy and mean margin over every (chosen, rejected) row of the split.

    Args:
        rewards: (N, 2) the rewards of each row's chosen and rejected response.
    """
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    if len(rewards) == 0:
        return {}
    diff = rewards[:, 0] - rewards[:, 1]  # (N,)
    return {
        "accuracy": float((diff > 0).mean()),
        "margin": float(diff.mean()),
        "mean_reward": float(rewards.mean()),
        "min_reward": float(rewards.min()),
        "max_reward": float(rewards.max()),
    }


def listwise_metrics(rewards, ranks) -> dict[str, float]:
    """Pair accuracy/margin, Kendall's tau and top-1 accuracy over ranked groups.

    Args:
        rewards: (G, K_max) rewards, one row per prompt.
        ranks: (G, K_max) the position of each response in the human ranking (0 = best),
            PAD_RANK (or any negative value) where a prompt has fewer than K_max responses.
    """
    rewards, ranks = np.asarray(rewards, dtype=np.float64), np.asarray(ranks)
    correct, margin_sum, n_pairs, taus, top1 = 0, 0.0, 0, [], []
    for r_row, k_row in zip(rewards, ranks, strict=True):
        keep = k_row >= 0
        r, k = r_row[keep], k_row[keep]
        i, j = np.triu_indices(len(r), k=1)
        # Orient every pair as (better, worse): the smaller rank is the better response.
        b = np.where(k[i] < k[j], i, j)
        w = np.where(k[i] < k[j], j, i)
        diff = r[b] - r[w]
        correct += int((diff > 0).sum())
        margin_sum += float(diff.sum())
        n_pairs += len(diff)
        taus.append(kendall_tau(r, -k))  # quality = -rank, so a perfect reward gives +1
        # Strictly above every other response: a constant reward must not score top-1 hits.
        best = np.argmin(k)
        top1.append(float(r[best] > np.delete(r, best).max()))
    if n_pairs == 0:
        return {}
    return {
        "accuracy": correct / n_pairs,
        "margin": margin_sum / n_pairs,
        # A prompt whose rewards are all equal has no defined tau; it counts as 0 (no ordering).
        "kendall_tau": float(np.mean([0.0 if np.isnan(t) else t for t in taus])),
        "top1_accuracy": float(np.mean(top1)),
    }
