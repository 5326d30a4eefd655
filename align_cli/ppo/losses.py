"""PPO's losses. Each returns `(loss, metrics)`: a scalar to minimise and detached tensors to log.

Shapes: B rows, R response positions; `mask` is the (B, R) response mask and every mean is
over the tokens it marks.
"""

from __future__ import annotations

import torch

from .core import entropy_from_logits, masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's clipped surrogate, negated to be minimised.

    L(theta) = E_t[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)], r_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t).

    Args:
        logprobs: (B, R) log pi_theta of the sampled tokens (carries the gradient).
        old_logprobs: (B, R) log pi_old from the rollout.
        advantages: (B, R) A_t.
        mask: (B, R) response mask.
        clip_range: eps.

    Returns:
        `(-L, metrics)` with `policy_loss`, `policy_clipfrac` (share of tokens where the clipped
        term is the smaller one, so its gradient is cut), `approx_kl` (k3 estimate of
        KL(pi_old || pi_theta)) and `ratio` (mean r_t).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "policy_clipfrac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's clipped regression to the returns.

    0.5 * E_t[max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)]: a new value far from the
    rollout value cannot lower the loss by moving further.

    Args:
        values: (B, R) V_theta(s_t) (carries the gradient).
        old_values: (B, R) V_old(s_t) from the rollout.
        returns: (B, R) G_t, the GAE returns.
        mask: (B, R) response mask.
        clip_range: c.

    Returns:
        `(loss, metrics)` with `value_loss` and `value_clipfrac` (share of tokens where the
        clipped error is the larger one).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_clipfrac": masked_mean((clipped_error > error).float(), mask),
        }
    return loss, metrics


def entropy_bonus(
    logits: torch.Tensor, mask: torch.Tensor, coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-coef * mean entropy of the policy: a positive `coef` rewards keeping the policy spread out.

    Args:
        logits: (B, R, V) the policy's logits at the response positions (at the sampling temperature).
        mask: (B, R) response mask.
        coef: the bonus weight; with 0 the entropy is only measured (no graph is kept).

    Returns:
        `(loss, metrics)` with `entropy` (mean per-token entropy in nats).
    """
    if coef == 0.0:
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        return torch.zeros((), device=logits.device), {"entropy": entropy}
    entropy = masked_mean(entropy_from_logits(logits), mask)
    return -coef * entropy, {"entropy": entropy.detach()}
