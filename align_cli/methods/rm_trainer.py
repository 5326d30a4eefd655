"""TRL's RewardTrainer taught the seed's pointwise and listwise losses, and exact held-out
metrics in every mode (the pairwise loss is TRL's own).

The subclasses keep everything RewardTrainer does around the loss (loading checks, LoRA and
k-bit handling, the pad token written into the model config, dropout off, logging) and
replace what depends on the data layout (through the public hooks of
`compat.reward_trainer_base`, which maps them onto RewardTrainer's private ones):

- `prepare_dataset`: one token sequence per (prompt, response) instead of chosen/rejected;
- the collator: `PointwiseCollator` (one row per response, with its score) or
  `ListwiseCollator` (all K responses of a prompt in one batch, best first);
- `compute_loss`: the losses of `rm_losses`;
- `prediction_step` + `compute_metrics`: predictions for the whole evaluation split, so the
  held-out metrics of `rm_metrics` (correlations, Kendall's tau) are not batch averages.

`PairwiseRewardTrainer` keeps TRL's data handling and loss and replaces only the evaluation
metrics: TRL logs the mean of per-batch accuracies and margins, which is not the split's value
when the last batch is smaller (or under several processes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..compat import reward_trainer_base
from ..data import prompt_key
from ..errors import AlignError
from ..rewards.model import tokenize_response
from .rm_losses import listwise_loss, pointwise_loss, ranked_pairs
from .rm_metrics import PAD_RANK, listwise_metrics, pairwise_metrics, pointwise_metrics

log = logging.getLogger("align")


def pad_right(seqs: list[list[int]], value: int, multiple_of: int | None = None) -> torch.Tensor:
    """(N, L) tensor of the sequences padded on the right; L rounded up to `multiple_of`."""
    length = max(len(s) for s in seqs)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class PointwiseCollator:
    """Batches (prompt + response) token ids with their target scores.

    Returns:
        input_ids, attention_mask: (N, L), right-padded.
        scores: (N,) float targets.
        groups: (N,) the prompt of each row as an id (when the examples have `group`).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        input_ids = pad_right(ids, self.pad_token_id, self.pad_to_multiple_of)
        batch = {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0, self.pad_to_multiple_of),
            "scores": torch.tensor([float(e["score"]) for e in examples], dtype=torch.float32),
        }
        if "group" in examples[0]:
            batch["groups"] = torch.tensor([e["group"] for e in examples], dtype=torch.long)
        return batch


@dataclass
class ListwiseCollator:
    """Flattens G ranked prompts into one batch of N = Σ K_g sequences, each prompt's responses
    contiguous and best first, so every pair of a prompt is compared within the batch.

    Returns:
        group_sizes: (G,) K_g per prompt. It comes first in the dict on purpose: transformers
            reads the batch size (used to weight the evaluation loss and to trim the last
            batch across processes) from the first tensor, and a sample here is a prompt.
        input_ids, attention_mask: (N, L), right-padded.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [seq for e in examples for seq in e["ranked_ids"]]
        return {
            "group_sizes": torch.tensor([len(e["ranked_ids"]) for e in examples], dtype=torch.long),
            "input_ids": pad_right(ids, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0, self.pad_to_multiple_of),
        }


class _ScoredRewardTrainer(reward_trainer_base()):
    """Shared by the pointwise and listwise trainers: one reward per tokenized response."""

    processed_column = "input_ids"
    collator_cls: type = PointwiseCollator

    def __init__(self, *, model, args, processing_class, **kwargs):
        kwargs.setdefault("compute_metrics", self.eval_metrics)
        # RewardTrainer would build its chosen/rejected collator; the tokenizer already has a
        # pad token (modeling.load_tokenizer sets one).
        kwargs.setdefault(
            "data_collator", self.collator_cls(processing_class.pad_token_id, args.pad_to_multiple_of)
        )
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)

    # -- data ------------------------------------------------------------------------------

    def _tokenize(self, example: dict, tokenizer) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _lengths(self, example: dict) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.processed_column in dataset.column_names:  # already tokenized (e.g. evaluate() again)
            return dataset
        dataset = dataset.map(
            self._tokenize,
            fn_kwargs={"tokenizer": processing_class},
            remove_columns=dataset.column_names,
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} dataset",
        )
        if args.max_length is not None:
            before = len(dataset)
            dataset = dataset.filter(
                lambda ex: max(self._lengths(ex)) <= args.max_length,
                num_proc=args.dataset_num_proc,
                desc=f"Filtering {dataset_name} >{args.max_length} tokens",
            )
            dropped = before - len(dataset)
            if dropped:
                log.warning(
                    "rm: dropped %d of %d %s rows longer than max_length=%d tokens (raise model.max_length "
                    "or method.args.max_length to keep them)",
                    dropped,
                    before,
                    dataset_name,
                    args.max_length,
                )
            if len(dataset) == 0:
                raise AlignError(
                    f"rm: every {dataset_name} row is longer than max_length={args.max_length} tokens; "
                    "raise model.max_length"
                )
        return dataset

    @property
    def signature_columns(self) -> list[str]:
        # Keep our tokenized columns through `remove_unused_columns`.
        return [self.processed_column, "score", "group"]

    # -- loss ------------------------------------------------------------------------------

    def rewards(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) float32 rewards, one per sequence of the batch."""
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()  # (N, 1) -> (N,)

    def loss_and_pairs(self, rewards, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, and the (better, worse) reward pairs of the batch for accuracy and margin."""
        raise NotImplementedError  # pragma: no cover

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = self.rewards(model, inputs)
        loss, better, worse = self.loss_and_pairs(rewards, inputs)
        if self.model.training:
            self._log_batch(inputs, rewards.detach(), better - worse)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _log_batch(self, inputs, rewards: torch.Tensor, diff: torch.Tensor) -> None:
        """Training metrics of this batch, averaged over processes.

        Only scalars are gathered, and every process gathers the same ones even when its batch
        has no pairs (NaN then): processes hold different numbers of sequences (K varies), and
        a collective call skipped on one process would hang the others.
        """
        nan = torch.tensor(float("nan"), device=rewards.device)
        stats = torch.stack(
            [
                inputs["attention_mask"].sum().float(),
                rewards.mean(),
                (diff > 0).float().mean() if len(diff) else nan,
                diff.mean() if len(diff) else nan,
            ]
        )
        gathered = self.accelerator.gather(stats[None, :])  # (processes, 4)
        tokens, mean_reward, accuracy, margin = gathered[:, 0].sum(), *gathered[:, 1:].nanmean(dim=0)
        metrics = self.logged_metrics("train")
        metrics["num_tokens"] = [self.count_train_tokens(int(tokens.item()))]
        metrics["mean_reward"].append(mean_reward.item())
        if not torch.isnan(accuracy):
            metrics["accuracy"].append(accuracy.item())
            metrics["margin"].append(margin.item())

    # -- evaluation ------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            rewards = self.rewards(model, inputs)
            loss, _, _ = self.loss_and_pairs(rewards, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        predictions, labels = self.eval_arrays(rewards.detach(), inputs)
        return loss.detach(), predictions, labels

    def eval_arrays(self, rewards, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What the evaluation loop concatenates over the split: (predictions, labels)."""
        raise NotImplementedError  # pragma: no cover

    def eval_metrics(self, prediction) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover


class PointwiseRewardTrainer(_ScoredRewardTrainer):
    """MSE between the reward and the human score of each (prompt, response)."""

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.processed_column not in dataset.column_names and "group" not in dataset.column_names:
            # Rows about the same prompt share a group id: pair metrics compare only those.
            ids: dict[str, int] = {}
            groups = [ids.setdefault(prompt_key({"prompt": p}), len(ids)) for p in dataset["prompt"]]
            dataset = dataset.add_column("group", groups)
        return super().prepare_dataset(dataset, processing_class, args, dataset_name)

    def _tokenize(self, example, tokenizer):
        return {
            "input_ids": tokenize_response(tokenizer, example["prompt"], example["completion"]),
            "score": float(example["score"]),
            "group": example["group"],
        }

    def _lengths(self, example):
        return [len(example["input_ids"])]

    def loss_and_pairs(self, rewards, inputs):
        scores, groups = inputs["scores"], inputs["groups"]  # (N,), (N,)
        # In-batch pairs of one prompt with different scores, oriented (better, worse): a cheap
        # training signal; evaluation uses every such pair of the split.
        better_mask = (scores[:, None] > scores[None, :]) & (groups[:, None] == groups[None, :])  # (N, N)
        b, w = better_mask.nonzero(as_tuple=True)
        return pointwise_loss(rewards, scores), rewards[b].detach(), rewards[w].detach()

    def eval_arrays(self, rewards, inputs):
        # Labels (scores, groups): the evaluation loop concatenates and gathers tuples too.
        return rewards, (inputs["scores"], inputs["groups"])  # (N,), ((N,), (N,))

    def eval_metrics(self, prediction):
        scores, groups = prediction.label_ids
        return pointwise_metrics(prediction.predictions, scores, groups)


class ListwiseRewardTrainer(_ScoredRewardTrainer):
    """The seed's ranking loss over all C(K,2) pairs of each prompt's K responses."""

    processed_column = "ranked_ids"
    collator_cls = ListwiseCollator

    def _tokenize(self, example, tokenizer):
        prompt = example["prompt"]
        return {"ranked_ids": [tokenize_response(tokenizer, prompt, c) for c in example["completions"]]}

    def _lengths(self, example):
        return [len(ids) for ids in example["ranked_ids"]]

    def loss_and_pairs(self, rewards, inputs):
        sizes = inputs["group_sizes"].tolist()
        loss = listwise_loss(rewards, sizes)
        if self.args.center_rewards_coefficient is not None:
            # As TRL's pairwise option: keeps rewards near zero, here over all K responses.
            loss = loss + self.args.center_rewards_coefficient * (rewards**2).mean()
        better, worse, _ = ranked_pairs(sizes, rewards.device)
        return loss, rewards[better].detach(), rewards[worse].detach()

    def eval_arrays(self, rewards, inputs):
        # One row per prompt, padded to this batch's largest K: the evaluation loop concatenates
        # batches (padding wider ones with -100 = PAD_RANK) and trims per prompt across processes.
        sizes = inputs["group_sizes"].tolist()
        k_max = max(sizes)
        preds = torch.zeros(len(sizes), k_max, device=rewards.device)  # (G, K_max)
        ranks = torch.full((len(sizes), k_max), PAD_RANK, dtype=torch.long, device=rewards.device)
        for g, chunk in enumerate(torch.split(rewards, sizes)):
            preds[g, : len(chunk)] = chunk
            ranks[g, : len(chunk)] = torch.arange(len(chunk), device=rewards.device)
        return preds, ranks

    def eval_metrics(self, prediction):
        return listwise_metrics(prediction.predictions, np.asarray(prediction.label_ids))


class PairwiseRewardTrainer(reward_trainer_base()):
    """TRL's pairwise RewardTrainer, with accuracy and margin over the whole evaluation split."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", self.eval_metrics)
        super().__init__(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        # TRL's compute_loss noted this batch's means; log() would average them over batches and
        # write them over the split's values that eval_metrics computes.
        self.logged_metrics("eval").clear()
        if prediction_loss_only:
            return loss.detach(), None, None
        chosen, rejected = torch.chunk(outputs.logits.detach().squeeze(-1).float(), chunks=2)  # (B,), (B,)
        # Labels only so that the evaluation loop calls compute_metrics: the margin column, or 0.
        labels = inputs["margin"] if "margin" in inputs else torch.zeros_like(chosen)
        return loss.detach(), torch.stack([chosen, rejected], dim=1), labels  # (B, 2), (B,)

    def eval_metrics(self, prediction) -> dict[str, float]:
        return pairwise_metrics(prediction.predictions)
