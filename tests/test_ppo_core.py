"""PPO's pure pieces against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from align_cli.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    group_relative,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    shaped_rewards,
    token_logprobs,
)
from align_cli.ppo.experience import Experience
from align_cli.ppo.losses import entropy_bonus, policy_loss, value_loss

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.float(), T(expected, dtype=torch.float32), atol=atol, rtol=0)


# --- masked statistics ----------------------------------------------------------------------


def test_masked_mean_and_var_ignore_masked_entries():
    values = T([[1.0, 2.0], [3.0, 4.0]])
    mask = T([[1.0, 0.0], [1.0, 1.0]])
    close(masked_mean(values, mask), 8 / 3)  # (1 + 3 + 4) / 3
    close(masked_mean(values, mask, dim=1), [1.0, 3.5])
    # deviations from 8/3: -5/3, 1/3, 4/3 -> squares sum to 42/9
    close(masked_var(values, mask, unbiased=False), 42 / 9 / 3)
    close(masked_var(values, mask), 42 / 9 / 2)
    close(masked_mean(values, torch.zeros_like(mask)), 0.0)  # nothing counts: 0, not nan


def test_masked_whiten():
    values = T([[2.0, 4.0, 6.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2; the masked 100 plays no part and comes back 0
    close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])


def test_token_logprobs_and_entropy():
    logits = T([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # softmax = [0.25, 0.75] at both positions
    close(token_logprobs(logits, T([[1, 0]])), [[math.log(0.75), math.log(0.25)]])
    # -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616
    close(entropy_from_logits(logits), [[0.5623351, 0.5623351]])


# --- the KL-shaped reward ---------------------------------------------------------------------

LOGP = T([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
REF = T([[-1.5, -1.0, -0.5], [-0.3, -2.2, -0.1]])
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 stopped after two tokens


def test_kl_estimators():
    # k1 = logp - ref; k3 = exp(ref - logp) - 1 + (logp - ref)
    close(kl_per_token(LOGP, REF, "k1")[0], [0.5, -1.0, 0.0])
    close(kl_per_token(LOGP, REF, "k3")[0], [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(LOGP, REF, "k2")


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    rewards, kl = shaped_rewards(T([2.0, -1.0]), LOGP, REF, MASK, kl_coef=0.1)
    # row 0: kl [0.5, -1, 0] -> -0.1*kl = [-0.05, 0.1, 0], score 2 on token 2
    # row 1: kl [0, 1, (masked)] -> [0, -0.1, 0], score -1 on token 1 (its last), nothing on token 2
    close(rewards, [[-0.05, 0.1, 2.0], [0.0, -1.1, 0.0]])
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]])


# --- GAE --------------------------------------------------------------------------------------

REWARDS = T([[0.1, -0.2, 1.0], [0.3, 2.0, 5.0]])  # row 1's 5.0 lies past its mask and must not count
VALUES = T([[0.5, 0.4, 0.3], [1.0, 0.5, 9.0]])


def test_gae_hand_computed():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    # row 0, gamma*lam = 0.72:
    #   t2: delta = 1.0 - 0.3 = 0.7                       A2 = 0.7
    #   t1: delta = -0.2 + 0.9*0.3 - 0.4 = -0.33           A1 = -0.33 + 0.72*0.7   = 0.174
    #   t0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04            A0 = -0.04 + 0.72*0.174 = 0.08528
    # row 1 ends at t1 (terminal after it):
    #   t1: delta = 2.0 - 0.5 = 1.5                        A1 = 1.5
    #   t0: delta = 0.3 + 0.9*0.5 - 1.0 = -0.25            A0 = -0.25 + 0.72*1.5   = 0.83
    close(adv, [[0.08528, 0.174, 0.7], [0.83, 1.5, 0.0]])
    close(ret, [[0.58528, 0.574, 1.0], [1.83, 2.0, 0.0]])


def test_gae_limits():
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t, the Monte-Carlo advantage
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    close(adv, [[0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3], [2.3 - 1.0, 2.0 - 0.5, 0.0]])
    close(ret, [[0.9, 0.8, 1.0], [2.3, 2.0, 0.0]])
    # lam = 0: A_t = the one-step TD error
    adv, _ = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    close(adv, [[0.1 + 0.4 - 0.5, -0.2 + 0.3 - 0.4, 1.0 - 0.3], [0.3 + 0.5 - 1.0, 2.0 - 0.5, 0.0]])


# --- losses -----------------------------------------------------------------------------------


def test_policy_loss_clips_hand_computed():
    ratios = T([[1.5, 1.5, 0.9, 5.0]])
    logprobs = torch.log(ratios).requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = T([[1.0, -1.0, 2.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])  # the wild last token is padding
    loss, m = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # t0: A>0, r=1.5: min(1.5, 1.2) = 1.2 (clipped)   t1: A<0: min(-1.5, -1.2) = -1.5 (not clipped)
    # t2: r=0.9 inside [0.8, 1.2]: 1.8                 objective (1.2 - 1.5 + 1.8) / 3 = 0.5
    close(loss, -0.5)
    close(m["policy_clipfrac"], 1 / 3)
    # k3 of KL(old || new): (r - 1) - ln r = 0.0945349, 0.0945349, 0.0053605
    close(m["approx_kl"], (2 * (0.5 - math.log(1.5)) + (-0.1 - math.log(0.9))) / 3)
    close(m["ratio"], (1.5 + 1.5 + 0.9) / 3)
    loss.backward()
    # d(-r A / 3)/d log r = -r A / 3 where unclipped; the clipped token and the padding get nothing
    close(logprobs.grad, [[0.0, 0.5, -0.6, 0.0]])


def test_value_loss_clips_hand_computed():
    values = T([[0.5, 0.9, 0.0]]).requires_grad_(True)
    old = T([[0.0, 1.0, 0.5]])
    returns = T([[1.0, 0.0, 0.6]])
    mask = torch.ones(1, 3)
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    # t0: clipped value 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64 (the clipped error wins)
    # t1: inside the range: 0.81 both ways          t2: clipped value 0.3: max(0.36, 0.09) = 0.36
    close(loss, 0.5 * (0.64 + 0.81 + 0.36) / 3)
    close(m["value_clipfrac"], 1 / 3)
    loss.backward()
    # t0 sits on the clipped branch (no gradient); t1: (0.9 - 0) / 3; t2: (0 - 0.6) / 3
    close(values.grad, [[0.0, 0.3, -0.2]])


def test_entropy_bonus():
    logits = T([[[0.0, math.log(3.0)], [0.0, 0.0]]]).requires_grad_(True)
    mask = T([[1.0, 0.0]])
    loss, m = entropy_bonus(logits, mask, coef=0.0)
    close(m["entropy"], 0.5623351)
    assert float(loss) == 0.0 and not loss.requires_grad
    loss, m = entropy_bonus(logits, mask, coef=0.5)
    close(loss, -0.5 * 0.5623351)
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # the masked position gets no gradient


# --- KL controllers ---------------------------------------------------------------------------


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    # e = clip(KL/6 - 1, -0.2, 0.2); beta *= 1 + e * 256 / 10000
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # e = +0.2 (clipped from 1.0)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(3.0, 256)  # e = -0.2 (clipped from -0.5)
    assert ctl.value == pytest.approx(0.1 * 0.99488)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(6.6, 256)  # e = 0.1
    assert ctl.value == pytest.approx(0.1 * 1.00256)
    assert ctl.state_dict() == {"value": pytest.approx(0.100256)}


# --- Experience -------------------------------------------------------------------------------


def test_experience_select_trims_unused_columns():
    # P = 3, R = 4; rows 0 and 2 have a 1-token prompt and 2-token responses; row 1 a longer prompt
    pad = 0
    seq = T([[pad, pad, 5, 6, 7, pad, pad], [8, 9, 5, 6, 7, 6, 2], [pad, pad, 4, 6, 2, pad, pad]])
    attn = (seq != pad).long()
    resp_mask = attn[:, 3:].float()
    zeros = torch.zeros(3, 4)
    exp = Experience(seq, attn, resp_mask, zeros, zeros, zeros, zeros, zeros, zeros, torch.zeros(3))
    assert len(exp) == 3 and exp.prompt_length == 3
    part = exp.select(T([0, 2]))
    assert part.sequences.tolist() == [[5, 6, 7], [4, 6, 2]]  # two prompt pads and two response pads dropped
    assert part.prompt_length == 1 and part.response_mask.shape == (2, 2)
    whole = exp.select(T([1, 0]))
    assert whole.sequences.shape == (2, 7) and whole.sequences[0].tolist() == seq[1].tolist()


def test_score_normalizer_fits_the_first_batch_and_keeps_it():
    from align_cli.ppo.core import ScoreNormalizer

    norm = ScoreNormalizer("init")
    first = T([2.0, 4.0, 6.0])  # mean 4, unbiased std 2
    close(norm(first), [-1.0, 0.0, 1.0])
    # Later batches use the starting policy's m = 4, s = 2, not their own statistics.
    close(norm(T([8.0, 8.0])), [2.0, 2.0])
    restored = ScoreNormalizer("init")
    restored.load_state_dict(norm.state_dict())
    close(restored(T([0.0])), [-2.0])
    # A first batch with no spread keeps the scale (s = 1) instead of dividing by 0.
    tied = ScoreNormalizer("init")
    close(tied(T([3.0, 3.0])), [0.0, 0.0])
    close(tied(T([5.0])), [2.0])
    close(ScoreNormalizer("none")(T([7.0, -1.0])), [7.0, -1.0])
    with pytest.raises(ValueError, match="score normalisation"):
        ScoreNormalizer("batch")


def test_group_relative_scores_hand_computed():
    """Rows come in groups of k responses to one prompt: center subtracts each group's mean, zscore
    also divides by its std; a group whose responses all score alike gives zeros, none is the identity."""
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, -2.0, 4.0])
    assert torch.equal(group_relative(scores, 2, "none"), scores)
    assert torch.equal(group_relative(scores, 1, "zscore"), scores)
    assert group_relative(scores, 2, "center").tolist() == [-1.0, 1.0, 0.0, 0.0, -3.0, 3.0]
    z = group_relative(scores, 2, "zscore")
    # group std (unbiased) of {1, 3} is sqrt(2), of {-2, 4} 3 sqrt(2); the tied group's is 0 (+ eps)
    r = 1 / math.sqrt(2.0)
    assert torch.allclose(z, torch.tensor([-r, r, 0.0, 0.0, -r, r]), atol=1e-3)
    # a prompt whose margin is 3x larger gets the same standardized advantages (what zscore is for)
    assert torch.allclose(z[:2], z[4:], atol=1e-4)
