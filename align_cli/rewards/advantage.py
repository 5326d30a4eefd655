"""The seed's rank-based group advantage (section 3.3), as a pure function.

For a prompt x the policy samples a group of K completions y_1..y_K, and each gets

    A(y_i) = (rank(y_i) - mean rank) / std(rank)

where rank 1 is the lowest reward and rank K the highest, so better-than-average
completions get a positive advantage and worse ones a negative one, whatever the scale or
outliers of the rewards. Only the order of the rewards matters.

Ties share the average of the ranks they span (two completions tied for ranks 2 and 3 both
get 2.5), so equal rewards always get equal advantages; a group whose rewards are all equal
carries no preference and gets zero advantage. `std` is the sample standard deviation
(divisor K - 1), the one TRL's group z-score uses, so `advantage=rank` is exactly TRL's
`advantage=zscore` applied to ranks instead of rewards, on the same scale.
"""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, ties sharing their average rank.

    rank_i = #{j : v_j < v_i} + (#{j : v_j == v_i} + 1) / 2, which is i's position in
    sorted order for distinct values and the mean of the tied positions otherwise. NaN
    entries compare as neither smaller nor equal, so they do not shift the others' ranks;
    their own rank is NaN.

    Args:
        values: (..., K) rewards.

    Returns:
        (..., K) float ranks in [1, K].
    """
    values = values.float()
    # (..., K, 1) against (..., 1, K): entry [i, j] compares v_i with v_j; K is small (a group).
    vi, vj = values.unsqueeze(-1), values.unsqueeze(-2)
    below = (vj < vi).sum(-1).float()
    equal = (vj == vi).sum(-1).float()
    ranks = below + (equal + 1) / 2
    return ranks.masked_fill(torch.isnan(values), float("nan"))


def rank_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """The seed's rank advantage, computed within each consecutive group of `group_size`.

    NaN rewards (a completion no reward function scored) are left out of their group's
    ranking and get advantage 0, as do groups with fewer than two scored completions or
    with all scores tied.

    Args:
        rewards: (N,) rewards, N = num_groups * group_size, each group's completions
            consecutive (the order TRL's sampler produces).
        group_size: K, completions per prompt.
        eps: guards the division; std is exactly 0 only for all-tied groups, handled apart.

    Returns:
        (N,) advantages on `rewards`' device, in its dtype if floating (else float32).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (G, K)
    valid = ~torch.isnan(grouped)  # (G, K)
    # Rank only the scored completions: NaNs never count as below or equal to anything.
    ranks = average_ranks(grouped)  # (G, K), NaN where the reward is NaN
    count = valid.sum(-1, keepdim=True).float()  # (G, 1)
    mean = torch.nansum(ranks, -1, keepdim=True) / count.clamp(min=1)  # (G, 1)
    centred = torch.where(valid, ranks - mean, torch.zeros_like(ranks))  # (G, K)
    std = torch.sqrt((centred**2).sum(-1, keepdim=True) / (count - 1).clamp(min=1))  # (G, 1), Bessel
    # All ties (std 0) or < 2 scored completions: no preference, no signal.
    informative = (count >= 2) & (std > eps)
    advantages = torch.where(informative & valid, centred / std.clamp(min=eps), torch.zeros_like(ranks))
    advantages = advantages.view(-1)
    return advantages.to(rewards.dtype) if rewards.is_floating_point() else advantages
