"""The reward-model losses against hand-computed values, the metrics against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align_cli.errors import AlignError
from align_cli.methods.rm_losses import (
    fit_normalizer,
    listwise_loss,
    pointwise_loss,
    ranked_pairs,
)
from align_cli.methods.rm_metrics import (
    PAD_RANK,
    kendall_tau,
    listwise_metrics,
    pairwise_metrics,
    pearson,
    pointwise_metrics,
    spearman,
)

# −log σ(d) = log(1 + e^−d), written out for the differences used below:
#   d = 1.5 -> 0.2014132780    d = 3 -> 0.0485873516    d = 0 -> 0.6931471806 (log 2)
#   d = 1   -> 0.3132616875    d = -1 -> 1.3132616875   d = -2 -> 2.1269280110


def test_listwise_loss_k3_by_hand():
    # Best first: rewards 2.0 > 0.5 > -1.0 agree with the ranking.
    # Pairs (0,1) d=1.5, (0,2) d=3.0, (1,2) d=1.5:
    # (0.2014132780 + 0.0485873516 + 0.2014132780) / C(3,2)=3 = 0.1504713025
    rewards = torch.tensor([2.0, 0.5, -1.0])
    assert listwise_loss(rewards, [3]).item() == pytest.approx(0.1504713025, abs=1e-7)


def test_listwise_loss_k4_by_hand():
    # Best first, but the model ties the top two and puts the worst response highest.
    # Pairs (0,1) d=0, (0,2) d=1, (0,3) d=-1, (1,2) d=1, (1,3) d=-1, (2,3) d=-2:
    # (0.6931471806 + 2·0.3132616875 + 2·1.3132616875 + 2.1269280110) / C(4,2)=6 = 1.0121869903
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    assert listwise_loss(rewards, [4]).item() == pytest.approx(1.0121869903, abs=1e-7)


def test_listwise_loss_mixed_k_averages_prompts_not_pairs():
    # K=3 and K=4 in one batch: the mean of the two prompt losses (0.1504713025 + 1.0121869903) / 2,
    # not the mean over all 3 + 6 pairs (which would weigh the K=4 prompt twice as much).
    rewards = torch.tensor([2.0, 0.5, -1.0, 1.0, 1.0, 0.0, 2.0], requires_grad=True)
    loss = listwise_loss(rewards, [3, 4])
    assert loss.item() == pytest.approx(0.5813291464, abs=1e-7)
    loss.backward()
    # Better responses are pushed up, worse ones down.
    assert rewards.grad[0] < 0 and rewards.grad[2] > 0 and rewards.grad[6] > 0


def test_ranked_pairs_layout():
    better, worse, weight = ranked_pairs([2, 3])
    assert better.tolist() == [0, 2, 2, 3] and worse.tolist() == [1, 3, 4, 4]
    assert weight.tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    with pytest.raises(ValueError, match="at least 2"):
        ranked_pairs([3, 1])


def test_listwise_with_k2_is_the_pairwise_loss():
    # Two prompts of K=2: the seed's pairwise loss -mean(log σ(r+ - r-)), d = 1 and d = -1.5.
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.0])
    flat = torch.stack([chosen, rejected], dim=1).reshape(-1)  # [c0, r0, c1, r1]
    assert listwise_loss(flat, [2, 2]).item() == pytest.approx((0.3132616875 + 1.7014132780) / 2, abs=1e-7)


def test_pointwise_loss_by_hand_in_float32():
    # ((−0.5)² + 1² + (−1)² + 0²) / 4 = 2.25 / 4, computed in float32 even for bfloat16 rewards
    # (a reward model trained in bf16 would otherwise square its errors at 8 bits of precision).
    rewards = torch.tensor([0.5, 2.0, -1.0, 0.0], dtype=torch.bfloat16, requires_grad=True)
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = pointwise_loss(rewards, scores)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5625)
    loss.backward()
    # d/dr (r - s)² / N = 2 (r - s) / 4: each reward is pulled toward its score.
    assert rewards.grad.float().tolist() == pytest.approx([-0.25, 0.5, -0.5, 0.0])


def test_normalizers_fit_on_train_scores():
    scores = [2.0, 4.0, 6.0, 8.0]
    assert fit_normalizer(scores, "none")(5.0) == 5.0
    minmax = fit_normalizer(scores, "minmax")
    assert [minmax(s) for s in scores] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert minmax(10.0) == pytest.approx(4 / 3)  # an eval score outside the train range is not clipped
    z = fit_normalizer(scores, "zscore")
    normed = np.array([z(s) for s in scores])
    assert normed.mean() == pytest.approx(0) and normed.std() == pytest.approx(1)
    assert z.as_dict() == {"method": "zscore", "shift": 5.0, "scale": pytest.approx(math.sqrt(5))}
    with pytest.raises(AlignError, match="minmax, zscore"):
        fit_normalizer(scores, "l2")
    with pytest.raises(AlignError, match="must differ"):
        fit_normalizer([1.0, 1.0], "zscore")


X = np.array([0.3, -1.2, 2.5, 0.3, 0.9, -0.4, 1.7, 0.0])
Y = np.array([1.0, -0.5, 2.0, 0.1, 0.1, -2.0, 3.0, 0.5])


def test_correlations_match_scipy():
    from scipy import stats

    assert pearson(X, Y) == pytest.approx(stats.pearsonr(X, Y)[0], abs=1e-12)
    assert spearman(X, Y) == pytest.approx(stats.spearmanr(X, Y)[0], abs=1e-12)  # ties in X and Y
    assert kendall_tau(X, Y) == pytest.approx(stats.kendalltau(X, Y)[0], abs=1e-12)  # tau-b
    assert math.isnan(pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))


def test_pointwise_metrics():
    from scipy import stats

    m = pointwise_metrics(X, Y)
    assert m["mse"] == pytest.approx(((X - Y) ** 2).mean())
    assert m["pearson"] == pytest.approx(stats.pearsonr(X, Y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(X, Y)[0])
    # Pairs with different scores, by brute force.
    pairs = [(i, j) for i in range(len(Y)) for j in range(len(Y)) if Y[i] > Y[j]]
    assert m["accuracy"] == pytest.approx(np.mean([X[i] > X[j] for i, j in pairs]))
    assert m["margin"] == pytest.approx(np.mean([X[i] - X[j] for i, j in pairs]))


def test_pointwise_pairs_are_only_within_a_prompt():
    rewards = np.array([0.9, 0.1, 0.5, 0.2, 0.7, 0.3])
    scores = np.array([1.0, 0.0, 0.2, 0.8, 0.5, 0.5])
    groups = np.array([0, 0, 1, 1, 2, 2])  # prompt 2's scores tie: no pair there
    m = pointwise_metrics(rewards, scores, groups)
    # Pairs (better, worse): (0, 1) right by 0.8, (3, 2) wrong by -0.3. Across prompts, row 0
    # vs row 2 etc. would count too without the groups.
    assert m["accuracy"] == pytest.approx(0.5) and m["margin"] == pytest.approx((0.8 - 0.3) / 2)
    assert pointwise_metrics(rewards, scores)["accuracy"] != pytest.approx(0.5)
    # No prompt with two different scores: no accuracy or margin at all, rather than NaN.
    m = pointwise_metrics(rewards, scores, np.arange(6))
    assert (
        "accuracy" not in m
        and "margin" not in m
        and m["mse"] == pytest.approx(((rewards - scores) ** 2).mean())
    )


def test_pairwise_metrics_are_over_every_row():
    rewards = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # (N, 2): chosen, rejected
    m = pairwise_metrics(rewards)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["margin"] == pytest.approx((1 - 2 + 2) / 3)
    assert (m["min_reward"], m["max_reward"], m["mean_reward"]) == pytest.approx((0.0, 3.0, 7 / 6))


def test_listwise_metrics_against_scipy():
    from scipy import stats

    # Prompt 1: K=3, perfectly ordered. Prompt 2: K=4, one swap at the bottom. Prompt 3: K=2,
    # reversed. Rows are padded to K_max=4 the way evaluation batches are concatenated.
    rewards = np.array([[3.0, 2.0, 1.0, 0.0], [4.0, 3.0, 1.0, 2.0], [0.0, 1.0, 0.0, 0.0]])
    ranks = np.array([[0, 1, 2, PAD_RANK], [0, 1, 2, 3], [0, 1, PAD_RANK, PAD_RANK]])
    m = listwise_metrics(rewards, ranks)
    # Pairs: 3 (all right) + 6 (5 right) + 1 (wrong) = 8 / 10 right.
    assert m["accuracy"] == pytest.approx(0.8)
    margins = [1, 2, 1] + [1, 3, 2, 2, 1, -1] + [-1]
    assert m["margin"] == pytest.approx(np.mean(margins))
    taus = [
        stats.kendalltau([3, 2, 1], [0, -1, -2])[0],
        stats.kendalltau([4, 3, 1, 2], [0, -1, -2, -3])[0],
        stats.kendalltau([0, 1], [0, -1])[0],
    ]
    assert taus == pytest.approx([1.0, 2 / 3, -1.0])
    assert m["kendall_tau"] == pytest.approx(np.mean(taus))
    assert m["top1_accuracy"] == pytest.approx(2 / 3)


def test_listwise_metrics_constant_rewards_score_no_hits():
    m = listwise_metrics(np.zeros((2, 3)), np.array([[0, 1, 2], [0, 1, 2]]))
    assert m["accuracy"] == 0 and m["top1_accuracy"] == 0 and m["kendall_tau"] == 0
