"""The PPO update: `num_ppo_epochs` passes over a rollout batch in mini-batches.

The losses themselves (clipped surrogate, clipped value loss, entropy bonus) are pure functions
in `losses.py`; this file runs them over the `Experience`, one optimiser step per mini-batch
(gradient accumulation over micro-batches), and builds the optimiser, with the critic in its
own parameter groups when `critic_learning_rate` is set.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .core import token_logprobs
from .experience import Experience
from .losses import entropy_bonus, policy_loss, value_loss
from .models import forward_inputs, sampling_logits
from .ptx import demonstration_nll


def split_critic_groups(optimizer: torch.optim.Optimizer, critic: nn.Module, critic_lr: float) -> None:
    """Moves the critic's parameters of every param group into a copy of that group with lr `critic_lr`.

    Done before the scheduler exists, so it scales each group from its own starting lr. The
    policy's groups stay first: the logged `learning_rate` is theirs.
    """
    critic_ids = {id(p) for p in critic.parameters()}
    policy_groups, critic_groups = [], []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) not in critic_ids]
        theirs = [p for p in group["params"] if id(p) in critic_ids]
        if mine:
            policy_groups.append({**group, "params": mine})
        if theirs:
            critic_groups.append({**group, "params": theirs, "lr": critic_lr})
    optimizer.param_groups = policy_groups + critic_groups


class PPOUpdate:
    """The update phase of `PPOTrainer` (a mixin: it uses the Trainer's optimiser, scheduler and callbacks)."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' AdamW (weight-decay groups and all), the critic at `critic_learning_rate` if set."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.args.critic_learning_rate is not None:
            split_critic_groups(optimizer, self.critic, self.args.critic_learning_rate)
        return optimizer

    def _unsynced(self, model: nn.Module):
        """Where gradients accumulate without being synced (DDP's `no_sync`).

        Under FSDP, nothing: each micro-batch's gradients are reduce-scattered into the shards
        as they come, so a rank never holds a full gradient (the memory FSDP is there to save).
        """
        return nullcontext() if getattr(self, "is_fsdp_enabled", False) else self.accelerator.no_sync(model)

    def ppo_loss(self, model: nn.Module, part: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on one micro-batch: policy + vf_coef * value - entropy_coef * entropy."""
        args = self.args
        width = part.response_mask.shape[1]
        logits, values = model(**forward_inputs(part.sequences, part.attention_mask), response_length=width)
        logits = sampling_logits(logits, args.temperature)
        logprobs = token_logprobs(logits, part.sequences[:, -width:])
        mask = part.response_mask
        p_loss, metrics = policy_loss(logprobs, part.logprobs, part.advantages, mask, args.cliprange)
        v_loss, v_metrics = value_loss(values, part.values, part.returns, mask, args.cliprange_value)
        loss = p_loss + args.vf_coef * v_loss
        if args.entropy_coef:  # otherwise the entropy is measured at rollout (make_experience)
            e_loss, e_metrics = entropy_bonus(logits, mask, args.entropy_coef)
            loss = loss + e_loss
            metrics.update(entropy_update=e_metrics["entropy"])
        return loss, {**metrics, **v_metrics, "loss": loss.detach()}

    def ptx_step(self, model: nn.Module) -> None:
        """ptx_coef x the policy's language-model loss on a batch of ptx rows (see ptx.py), backward.

        Run under `no_sync`: its gradients join the mini-batch's and are all-reduced with them.
        """
        args = self.args
        size = args.ptx_batch_size or args.mini_batch_size
        rows = torch.randint(len(self.ptx_pairs), (size,), generator=self._ptx_shuffle).tolist()
        policy = self.accelerator.unwrap_model(model).policy
        nll = demonstration_nll(
            policy,
            self.ptx_pairs,
            rows,
            self.processing_class.pad_token_id,
            args.max_length,
            self.accelerator.device,
        )
        self.accelerator.backward(args.ptx_coef * nll)
        self._micro_metrics_ptx.append(nll.detach())

    def training_step(
        self, model: nn.Module, inputs: Experience, num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One micro-batch: forward, PPO loss, backward; returns the loss (detached).

        Args:
            model: the prepared `PolicyAndCritic`.
            inputs: the micro-batch.
            num_items_in_batch: response tokens in the whole mini-batch; the micro-batch's loss
                (a mean over its own tokens) is weighted by its share of them.
        """
        loss, metrics = self.ppo_loss(model, inputs)
        weight = inputs.response_mask.sum() / num_items_in_batch if num_items_in_batch is not None else 1.0
        self.accelerator.backward(loss * weight)
        self._micro_metrics.append(metrics)
        return loss.detach()

    def ppo_update(self, model: nn.Module, experience: Experience) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` passes over the batch; returns the mean of each metric.

        Each mini-batch's loss is the mean over its response tokens, however it is split into
        micro-batches (see `training_step`). So the split is free, and rows of similar length go
        together, which cuts the padding computed.
        """
        args = self.args
        model.train()
        self._micro_metrics: list[dict[str, torch.Tensor]] = []
        self._micro_metrics_ptx: list[torch.Tensor] = []
        grad_norms = []
        micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        # Reseeded from the step, so a resumed run shuffles exactly as an uninterrupted one.
        self._shuffle.manual_seed(args.seed * 1_000_003 + self.state.global_step)
        self._ptx_shuffle.manual_seed(
            args.seed * 1_000_033 + self.state.global_step * 7 + self.accelerator.process_index
        )
        lengths = experience.attention_mask.sum(1)  # (B,) real tokens per row
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(experience), generator=self._shuffle).to(lengths.device)
            for m in range(args.num_mini_batches):
                mini = order[m * args.mini_batch_size : (m + 1) * args.mini_batch_size]
                mini = mini[torch.argsort(lengths[mini], stable=True)]
                tokens = experience.response_mask[mini].sum().clamp(min=1)
                if self.ptx_pairs:
                    with self._unsynced(model):  # synced with the last micro-batch below
                        self.ptx_step(model)
                for a in range(accumulation):
                    part = experience.select(mini[a * micro : (a + 1) * micro])
                    # DDP: gradients are all-reduced once per optimiser step, not per micro-batch.
                    sync = a == accumulation - 1
                    with nullcontext() if sync else self._unsynced(model):
                        self.training_step(model, part, tokens)
                if args.max_grad_norm and args.max_grad_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                        norm = norm.full_tensor()
                    grad_norms.append(torch.as_tensor(norm).detach().float())
                # The loss guard (align_cli/guard.py) checks the gradients here, before they are applied.
                self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                self.optimizer.step()
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        out = {
            key: torch.stack([m[key].float() for m in self._micro_metrics]).mean()
            for key in self._micro_metrics[0]
        }
        if self._micro_metrics_ptx:
            out["ptx_loss"] = torch.stack(self._micro_metrics_ptx).mean()
        if grad_norms:
            out["grad_norm"] = torch.stack(grad_norms).mean()
        return out
