"""The PPO update: `num_ppo_epochs` passes over a rollout batch in mini-batches.

The losses themselves (clipped surrogate, clipped value loss, entropy bonus) are pure functions
in `losses.py`; this file runs them over the `Experience`, one optimiser step per mini-batch
(gradient accumulation over micro-batches), and builds the optimiser, with the critic in its
own parameter groups when `critic_learning_rate` is set.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

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


class EngineLogits:
    """The policy called through the DeepSpeed engine's forward (`PolicyAndCritic` with
    `values=False`), as `demonstration_nll` calls a causal LM: ZeRO counts the parts of an
    optimiser step by the engine's forward calls, and a backward it did not count would
    overwrite the gradients of the parts before it."""

    def __init__(self, engine: nn.Module):
        self.engine = engine

    def __call__(self, input_ids, attention_mask, position_ids, logits_to_keep: int, use_cache: bool = False):
        logits, _ = self.engine(input_ids, attention_mask, position_ids, logits_to_keep, values=False)
        return SimpleNamespace(logits=logits)


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
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        return nullcontext() if sharded else self.accelerator.no_sync(model)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one part of a mini-batch; `last`: the optimiser steps after this part.

        Under DeepSpeed (dist=zero2|zero3), the engine's own backward, told where the mini-batch
        ends (ZeRO reduces its partitioned gradients there) and not to divide the loss by its
        accumulation count: each part's loss is already weighted by its share of the mini-batch's
        tokens, and the ptx loss is one more part than the engine would count.
        """
        if getattr(self, "is_deepspeed_enabled", False):
            engine = self.model_wrapped
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

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

    def ptx_step(self, policy: nn.Module | EngineLogits, last: bool = False) -> None:
        """ptx_coef x the policy's language-model loss on a batch of ptx rows (see ptx.py), backward.

        Run under `no_sync` before the mini-batch's parts: its gradients join theirs and are
        all-reduced with them. Under DeepSpeed it is the last part instead (`last`), through the
        engine's forward: ZeRO-3's first backward of an optimiser step overwrites each gradient
        partition and later ones add to it, so a critic parameter that a first ptx backward
        does not reach would keep the previous step's gradient. `policy` is what `ppo_update`
        made for it: the bare policy, or under DeepSpeed the engine's forward (`EngineLogits`).
        """
        args = self.args
        size = args.ptx_batch_size or args.mini_batch_size
        rows = torch.randint(len(self.ptx_pairs), (size,), generator=self._ptx_shuffle).tolist()
        nll = demonstration_nll(
            policy,
            self.ptx_pairs,
            rows,
            self.processing_class.pad_token_id,
            args.max_length,
            self.accelerator.device,
        )
        self._backward(args.ptx_coef * nll, last)
        self._micro_metrics_ptx.append(nll.detach())

    def training_step(
        self,
        model: nn.Module,
        inputs: Experience,
        num_items_in_batch: torch.Tensor | None = None,
        last: bool = True,
    ) -> torch.Tensor:
        """One micro-batch: forward, PPO loss, backward; returns the loss (detached).

        Args:
            model: the prepared `PolicyAndCritic`.
            inputs: the micro-batch.
            num_items_in_batch: response tokens in the whole mini-batch; the micro-batch's loss
                (a mean over its own tokens) is weighted by its share of them.
            last: the mini-batch's last micro-batch (the optimiser steps after it).
        """
        loss, metrics = self.ppo_loss(model, inputs)
        weight = inputs.response_mask.sum() / num_items_in_batch if num_items_in_batch is not None else 1.0
        self._backward(loss * weight, last)
        self._micro_metrics.append(metrics)
        return loss.detach()

    def _deepspeed_step(self, engine: nn.Module) -> list[torch.Tensor]:
        """The optimiser step of a mini-batch under DeepSpeed; its gradient norm, if clipped.

        The engine clips (its `gradient_clipping` is max_grad_norm), steps and zeroes the
        gradients; the scheduler is ours, over the engine's optimiser groups.
        """
        args = self.args
        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
        engine.step()
        self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
        self.lr_scheduler.step()
        norm = engine.get_global_grad_norm()
        if not (args.max_grad_norm and args.max_grad_norm > 0) or norm is None:
            return []
        return [torch.as_tensor(float(norm)).float()]

    def ppo_update(self, model: nn.Module, experience: Experience) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` passes over the batch; returns the mean of each metric.

        Each mini-batch's loss is the mean over its response tokens, however it is split into
        micro-batches (see `training_step`). So the split is free, and rows of similar length go
        together (longest first), which cuts the padding computed.
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
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        ptx_last = bool(self.ptx_pairs) and deepspeed  # see ptx_step
        # What the ptx loss runs through, made once per update (unwrap_model costs ~3 ms a call): under
        # DeepSpeed the engine's forward, which keeps ZeRO's accumulation count; else the bare policy.
        ptx_policy = None
        if self.ptx_pairs:
            ptx_policy = EngineLogits(model) if ptx_last else self.accelerator.unwrap_model(model).policy
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(experience), generator=self._shuffle).to(lengths.device)
            for m in range(args.num_mini_batches):
                mini = order[m * args.mini_batch_size : (m + 1) * args.mini_batch_size]
                # Longest rows first: each later micro-batch fits in the memory the one before it
                # freed. Shortest first, every micro-batch outgrew the freed blocks and the CPU
                # heap kept them too (0.46 GB more peak at 50M parameters, docs/benchmarks.md).
                mini = mini[torch.argsort(lengths[mini], stable=True, descending=True)]
                tokens = experience.response_mask[mini].sum().clamp(min=1)
                if self.ptx_pairs and not ptx_last:
                    with self._unsynced(model):  # synced with the last micro-batch below
                        self.ptx_step(ptx_policy)
                for a in range(accumulation):
                    part = experience.select(mini[a * micro : (a + 1) * micro])
                    # DDP: gradients are all-reduced once per optimiser step, not per micro-batch.
                    sync = a == accumulation - 1
                    with nullcontext() if sync else self._unsynced(model):
                        self.training_step(model, part, tokens, last=sync and not ptx_last)
                if ptx_last:
                    self.ptx_step(ptx_policy, last=True)
                if deepspeed:
                    grad_norms += self._deepspeed_step(model)
                    continue
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
