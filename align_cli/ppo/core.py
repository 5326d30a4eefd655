"""Pure tensor functions of PPO: masked statistics, the KL-shaped reward, GAE, KL control.

Nothing here knows about models or trainers, so each function is tested against tensors
worked out by hand (tests/test_ppo_core.py). Shapes: B rows, R response positions; a
response mask is 1 on the tokens a response really has (up to and including its stop
token) and 0 after, always a prefix of the row.
"""

from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "k3")
GROUP_SCORES = ("none", "center", "zscore")
SCORE_NORMS = ("none", "init")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`); 0 where nothing counts."""
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1 (Bessel-corrected when `unbiased` and n > 1)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scales `values` to unit variance over the masked entries (and zero mean when `shift_mean`).

    Entries outside the mask come back as 0, so they can never leak into a loss.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, without materialising the (B, R, V) log-softmax.

    Args:
        logits: (B, R, V) float.
        tokens: (B, R) long.

    Returns:
        (B, R) float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, R)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum(p * z). (B, R, V) -> (B, R)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, never negative, lower variance; Schulman's "Approximating KL").
    """
    log_ratio = logprobs - ref_logprobs  # log pi/pi_ref, (B, R)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, R) prefix mask; 0 for an empty row. -> (B,) long."""
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token reward of RLHF: r_t = -beta * KL_t, plus the score on the last real token.

    Args:
        scores: (B,) the reward model / reward functions' score of each response.
        logprobs: (B, R) log pi_old of the sampled tokens.
        ref_logprobs: (B, R) log pi_ref of the same tokens.
        mask: (B, R) response mask.
        kl_coef: beta.
        estimator: "k1" or "k3" (see `kl_per_token`).

    Returns:
        `(rewards, kl)`, both (B, R) and 0 outside the mask.
    """
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where the
    state after the last real token is terminal (V = 0, A = 0).

    Args:
        rewards: (B, R) per-token rewards.
        values: (B, R) V(s_t) from the critic at rollout time.
        mask: (B, R) response mask (a prefix per row).
        gamma: discount.
        lam: GAE lambda.

    Returns:
        `(advantages, returns)`, both (B, R), returns = advantages + values, 0 outside the mask.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Steers beta so the policy's KL to the reference approaches a target (Ziegler et al. 2019).

    After each batch: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    with n the episodes in the batch. A KL above target raises beta, below lowers it.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        super().__init__(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class ScoreNormalizer:
    """Puts scores on the starting policy's scale: (score - m) / s (Ziegler et al. 2019, section 2.2).

    `m` and `s` are the mean and standard deviation of the first batch of scores it sees (the
    rollout of the starting policy, the reference) and stay fixed after, so the shaped reward
    keeps one meaning for the whole run: a reward model scoring on a +-8 scale and one scoring
    on +-0.5 give the same PPO update, and `kl_coef` trades KL against reward in units of the
    starting policy's reward spread. With `mode="none"` scores pass through unchanged.
    """

    def __init__(self, mode: str = "none", eps: float = 1e-6):
        if mode not in SCORE_NORMS:
            raise ValueError(f"unknown score normalisation {mode!r}: use one of {SCORE_NORMS}")
        self.mode, self.eps = mode, eps
        self.mean: float | None = None
        self.std: float | None = None

    def fit(self, scores: torch.Tensor) -> None:
        """Sets m and s from (N,) scores (a tie everywhere has no spread to measure: s stays 1)."""
        self.mean = float(scores.float().mean())
        std = float(scores.float().std()) if scores.numel() > 1 else 0.0
        self.std = std if math.isfinite(std) and std > self.eps else 1.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) scores -> (B,) normalised scores (fitting m and s on the first call if not fitted)."""
        if self.mode == "none":
            return scores
        if self.mean is None:
            self.fit(scores)
        return (scores - self.mean) / self.std

    def state_dict(self) -> dict[str, float | None]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.mean, self.std = state.get("mean"), state.get("std")


def group_relative(scores: torch.Tensor, group: int, mode: str, eps: float = 1e-4) -> torch.Tensor:
    """Each score relative to the others of its prompt's group (`mode`: none | center | zscore).

    `scores` holds the responses of a rollout in groups of `group` consecutive rows, one group per
    prompt. center: minus the group mean (a per-prompt baseline: what a prompt's kind or language adds
    to every response's score cancels); zscore: also divided by the group's std (+ eps), as GRPO
    standardises, so every prompt's better responses gain alike, whatever the reward model's margin
    on that prompt. A group whose responses all score the same gives 0s.
    """
    if mode == "none" or group < 2:
        return scores
    grouped = scores.view(-1, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if mode == "zscore":
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.reshape(scores.shape)
