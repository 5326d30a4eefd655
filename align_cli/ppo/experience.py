"""What one rollout produces, and how the update phase slices it.

Shapes use B = rollout rows, P = prompt columns (left-padded), R = response columns
(right-padded after the first stop token), T = P + R.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    """A batch of sampled responses with everything the PPO update needs.

    `logprobs`, `values` and the derived tensors are indexed by response position: column t
    describes the action "emit response token t" taken in the state "prompt + tokens < t".
    Every per-token tensor is zero (or meaningless) where `response_mask` is 0.
    """

    sequences: torch.Tensor  # (B, T) long: prompt ids (left-padded) then response ids (right-padded)
    attention_mask: (
        torch.Tensor
    )  # (B, T) long: 1 on real prompt tokens and on response tokens up to the stop token
    response_mask: torch.Tensor  # (B, R) float: 1 on response tokens up to and including the stop token
    logprobs: torch.Tensor  # (B, R) float: log pi_old(a_t | s_t), at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) float: log pi_ref(a_t | s_t)
    values: torch.Tensor  # (B, R) float: V_old(s_t) from the critic
    rewards: torch.Tensor  # (B, R) float: -beta * KL_t, plus the score at the last response token
    advantages: torch.Tensor  # (B, R) float: GAE advantages (whitened over the batch when asked)
    returns: torch.Tensor  # (B, R) float: advantages + values (before whitening): the critic's targets
    scores: torch.Tensor  # (B,) float: the reward (model/functions) per response, after any EOS penalty

    @property
    def prompt_length(self) -> int:
        """P: the number of prompt columns."""
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor | slice) -> Experience:
        """The rows `index` (a micro-batch), trimmed to the columns some selected row uses.

        Trimming drops prompt columns that are padding in every selected row and response
        columns past every selected row's stop token, so a micro-batch of short responses
        costs only what it holds.
        """
        rows = {f.name: getattr(self, f.name)[index] for f in fields(self)}
        prompt_len = self.prompt_length
        prompt_used = rows["attention_mask"][:, :prompt_len].any(dim=0).nonzero()  # (n, 1)
        first = int(prompt_used[0, 0]) if len(prompt_used) else prompt_len - 1
        resp_used = rows["response_mask"].any(dim=0).nonzero()
        width = int(resp_used[-1, 0]) + 1 if len(resp_used) else 1
        for name in ("sequences", "attention_mask"):
            rows[name] = rows[name][:, first : prompt_len + width]
        for name in (
            "response_mask",
            "logprobs",
            "ref_logprobs",
            "values",
            "rewards",
            "advantages",
            "returns",
        ):
            rows[name] = rows[name][:, :width]
        return Experience(**rows)

    def to(self, device: torch.device | str) -> Experience:
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
