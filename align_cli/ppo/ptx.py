"""The pretraining mix of InstructGPT's PPO-ptx objective (Ouyang et al. 2022, eq. 2).

    objective = E[score - beta * KL(pi || pi_ref)] + gamma * E_{x ~ ptx data}[log pi(x)]

Each optimiser step of the update adds `ptx_coef` (gamma) x the language-model loss of the
policy on a batch of demonstrations (prompt + completion, loss on the completion tokens). The
KL penalty's pull back to pi_ref fades as a response's probability nears 0 (it is weighted by
that probability), so once one answer stops being sampled nothing brings it back; the ptx loss
pulls hardest exactly there. On the harmlessness task that is what keeps PPO from settling on
one answer per language before it has learnt which prompts want which (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AlignError
from .core import token_logprobs
from .models import forward_inputs


def tokenize_demonstrations(tokenizer: Any, dataset: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every row of an SFT-standard dataset (prompt/completion).

    Conversational rows are laid out by the chat template, the completion being what the
    template adds after the generation prompt (its end-of-turn tokens included); plain text
    rows get the tokenizer's EOS after the completion.
    """
    if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
        raise AlignError(
            f"data.ptx_path: the ptx data needs prompt and completion columns (an SFT layout such as "
            f"instruction/output or messages), found {', '.join(dataset.column_names)}"
        )
    pairs = []
    for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
        if isinstance(prompt, list):
            head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            if not full.startswith(head):
                raise AlignError(
                    "data.ptx_path: the chat template lays out a conversation differently from its prompt, "
                    "so the completion's tokens cannot be told apart; give the ptx data as plain text"
                )
            p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        else:
            p_ids = tokenizer(prompt)["input_ids"]
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if c_ids:
            pairs.append((p_ids, c_ids))
    if not pairs:
        raise AlignError("data.ptx_path: no row of the ptx data has a non-empty completion")
    return pairs


def ptx_batch(
    pairs: list[tuple[list[int], list[int]]], rows: list[int], pad_id: int, max_length: int | None
) -> dict[str, torch.Tensor]:
    """Rows laid out as the rollouts are: left-padded prompt, then right-padded completion.

    So the policy reads them with the same `forward_inputs` / `response_length`. A pair longer
    than `max_length` keeps the end of its prompt and the start of its completion.
    """
    chosen = []
    for r in rows:
        prompt, completion = pairs[r]
        if max_length and len(prompt) + len(completion) > max_length:
            completion = completion[: max(1, max_length // 2)]
            prompt = prompt[-(max_length - len(completion)) :]
        chosen.append((prompt, completion))
    width_p = max(len(p) for p, _ in chosen)
    width_c = max(len(c) for _, c in chosen)
    seq = torch.full((len(chosen), width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros_like(seq)
    for i, (p, c) in enumerate(chosen):
        seq[i, width_p - len(p) : width_p] = torch.tensor(p)
        seq[i, width_p : width_p + len(c)] = torch.tensor(c)
        mask[i, width_p - len(p) : width_p + len(c)] = 1
    return {"sequences": seq, "attention_mask": mask, "completion_mask": mask[:, width_p:]}


def demonstration_nll(
    policy: Any,
    pairs: list[tuple[list[int], list[int]]],
    rows: list[int],
    pad_id: int,
    max_length: int | None,
    device: torch.device,
) -> torch.Tensor:
    """The policy's mean negative log-likelihood of the completion tokens of `rows` (with grad)."""
    batch = {k: v.to(device) for k, v in ptx_batch(pairs, rows, pad_id, max_length).items()}
    width = batch["completion_mask"].shape[1]
    inputs = forward_inputs(batch["sequences"], batch["attention_mask"])
    # logits_to_keep: the LM head runs on the completion positions only.
    logits = policy(**inputs, logits_to_keep=width, use_cache=False).logits
    logprobs = token_logprobs(logits.float(), batch["sequences"][:, -width:])
    mask = batch["completion_mask"].float()
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)
