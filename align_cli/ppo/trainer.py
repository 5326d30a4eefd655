"""Our PPO trainer: a `transformers.Trainer` whose `train()` runs the RLHF loop (orchestration only).

Each step (one `global_step`):

1. rollout (`experience.ExperienceMaker`): sample responses to a batch of prompts, score them
   with the rewards, run the policy, the reference and the critic over the sampled tokens for
   log pi_old, log pi_ref and V_old, shape the per-token reward (-beta * KL, the score at the
   last real token) and compute GAE advantages and returns;
2. update (`update.PPOUpdate`): `num_ppo_epochs` passes over the batch in mini-batches, one
   optimiser step each: clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy;
3. bookkeeping: the KL controller, metrics, and transformers' callbacks, which drive logging,
   the progress bar, `report_to`, evaluation (`evaluation.PPOEvaluation`, with the sample
   table) and checkpoints (`checkpoints.PPOCheckpoints`) exactly as for other trainers.

The policy and the critic train as one module (`models.PolicyAndCritic`) with one optimiser
(the critic in its own param groups with `critic_learning_rate`). Which module plays the
reference and how each role is read is `models.py`; under `dist=fsdp`, how each is sharded is
`sharding.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint, speed_metrics

from ..compat import loop_trainer_base
from ..errors import AlignError
from .checkpoints import PPOCheckpoints
from .config import PPOConfig
from .evaluation import PPOEvaluation
from .experience import ExperienceMaker, check_inputs
from .models import (  # noqa: F401  (forward_inputs, reward_model_scores, sampling_only, value_head: re-exported)
    PolicyAndCritic,
    forward_inputs,
    is_quantized,
    prepare_roles,
    reward_model_scores,
    sampling_only,
    unwrap_peft,
    value_head,
)
from .ptx import tokenize_demonstrations
from .sharding import local_and_total_numel, shard_roles
from .update import PPOUpdate

log = logging.getLogger("align")


def tokenize_prompts(tokenizer: Any, dataset: Any, args: PPOConfig) -> list[list[int]]:
    """Token ids of every prompt (chat template with the generation prompt for messages)."""
    prompts = dataset["prompt"]
    if prompts and isinstance(prompts[0], list):
        texts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts
        ]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(list(prompts))["input_ids"]
    if args.max_length:
        # Cutting a prompt would hide part of it from the policy but not from the rewards.
        limit = args.max_length - args.max_new_tokens
        long = [i for i, row in enumerate(ids) if len(row) > limit]
        if long:
            raise AlignError(
                f"{len(long)} of {len(ids)} prompts are longer than max_length - max_new_tokens = "
                f"{args.max_length} - {args.max_new_tokens} = {limit} tokens (first: row "
                f"{long[0]}, {len(ids[long[0]])} tokens): raise model.max_length or shorten these prompts"
            )
    return ids


class PPOTrainer(PPOUpdate, PPOEvaluation, PPOCheckpoints, loop_trainer_base()):
    """PPO with a critic and KL-shaped rewards, driven through transformers' callbacks.

    Args:
        policy: the causal LM to train (usually an SFT model).
        critic: a sequence-classification model with one output (the value model), e.g. a
            copy of the reward model; its head is read at every response position.
        args: the `PPOConfig`.
        processing_class: the policy's tokenizer (with a pad token).
        train_dataset: prompts: a `prompt` column (text or chat messages) and any extra
            columns the reward functions read.
        reward_funcs: reward functions `f(prompts, completions, **columns) -> list[float | None]`
            (e.g. from `align_cli.rewards`); with `reward_model_input=tokens`, the reward models
            among them (a `.model` and `.tokenizer` attribute) read the sampled token ids.
        reward_weights: one weight per reward function (default 1.0 each); the score is the
            weighted sum (a function's None counts as 0).
        eval_dataset: prompts for `evaluate()`, which also writes the sample table.
        ref_model: the reference policy; None: a frozen copy of `policy`, or with `peft_config`
            the policy with its adapter disabled.
        peft_config / critic_peft_config: LoRA configs for the policy / the critic (QLoRA when
            the models were loaded in 4 bit).
        callbacks: extra `TrainerCallback`s.
        probe: degenerate texts scored by the reward model (`align_cli.diagnostics.Probe`),
            logged every step as `probe/<name>` and `probe_reward`; None: not logged.
        ptx_dataset: demonstrations (SFT standard: prompt/completion) for the PPO-ptx loss
            (`args.ptx_coef`, see ptx.py); None or ptx_coef 0: no ptx loss.
    """

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module,
        args: PPOConfig,
        processing_class: Any,
        train_dataset: Any,
        reward_funcs: Sequence[Callable],
        reward_weights: Sequence[float] | None = None,
        eval_dataset: Any = None,
        ref_model: nn.Module | None = None,
        peft_config: Any = None,
        critic_peft_config: Any = None,
        callbacks: list | None = None,
        probe: Any = None,
        ptx_dataset: Any = None,
    ):
        check_inputs(reward_funcs, reward_weights, processing_class)
        policy, critic, ref_model = prepare_roles(
            policy, critic, ref_model, args, peft_config, critic_peft_config
        )
        super().__init__(
            model=PolicyAndCritic(policy, critic),
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )
        self.ref_model = ref_model
        # Under FSDP, fully_shard moves each layer to the device as it shards it (train()), as
        # transformers leaves policy and critic where they are: no whole copy on the device first.
        if ref_model is not None and not is_quantized(ref_model) and not self.is_fsdp_enabled:
            ref_model.to(self.accelerator.device)
        self.experience_maker = ExperienceMaker(
            policy,
            critic,
            ref_model,
            processing_class,
            reward_funcs,
            args,
            self.accelerator,
            reward_weights=reward_weights,
            probe=probe,
            trainer_state=lambda: self.state,
        )
        # Shared with the maker: the checkpoints save and restore them.
        self.kl_ctl = self.experience_maker.kl_ctl
        self.score_norm = self.experience_maker.score_norm
        self._train_prompt_ids = self._tokenize_prompts(train_dataset)
        self._eval_prompt_ids = self._tokenize_prompts(eval_dataset) if eval_dataset is not None else None
        self._permutations: dict[int, list[int]] = {}
        self._shuffle = torch.Generator().manual_seed(args.seed)
        self._log_buffer: dict[str, list[float]] = defaultdict(list)
        # (prompt ids, completion ids) of the ptx demonstrations, or None: no ptx loss.
        self.ptx_pairs = None
        if ptx_dataset is not None and args.ptx_coef > 0:
            self.ptx_pairs = tokenize_demonstrations(processing_class, ptx_dataset)
        # Its own stream (seeded per step in `ppo_update`), so turning ptx on does not change
        # which rollout rows are shuffled how.
        self._ptx_shuffle = torch.Generator()

    # --- placement, data --------------------------------------------------------------------

    def place_model(self, model: nn.Module, device: torch.device) -> None:
        # bitsandbytes models cannot be moved with .to(); place the others one by one.
        for part in (model.policy, model.critic):
            if not is_quantized(unwrap_peft(part)):
                part.to(device)

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def critic(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).critic

    @property
    def reward_funcs(self) -> list[Callable]:
        return self.experience_maker.reward_funcs

    @property
    def reward_names(self) -> list[str]:
        return self.experience_maker.reward_names

    def _tokenize_prompts(self, dataset: Any) -> list[list[int]]:
        return tokenize_prompts(self.processing_class, dataset, self.args)

    def _batch_rows(self, step: int) -> list[int]:
        """Dataset rows of this process's rollout batch at `step`: a fresh shuffle per pass over the data.

        Each prompt's row comes `samples_per_prompt` times in a row (a group). A pure function of the
        step, so a resumed run samples exactly the prompts it would have.
        """
        n = len(self._train_prompt_ids)
        size = self.args.rollout_prompts
        start = (step * self.accelerator.num_processes + self.accelerator.process_index) * size
        rows = []
        for pos in range(start, start + size):
            epoch, i = divmod(pos, n)
            if epoch not in self._permutations:
                gen = torch.Generator().manual_seed(self.args.seed + epoch)
                self._permutations = {epoch: torch.randperm(n, generator=gen).tolist(), **self._permutations}
                for old in [e for e in self._permutations if e < epoch - 1]:
                    del self._permutations[old]
            rows.extend([self._permutations[epoch][i]] * self.args.samples_per_prompt)
        return rows

    # --- the loop ---------------------------------------------------------------------------

    def _max_steps(self) -> int:
        args = self.args
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        episodes = args.total_episodes or math.ceil(
            args.num_train_epochs * len(self._train_prompt_ids) * args.samples_per_prompt
        )
        return max(1, math.ceil(episodes / (args.rollout_batch_size * self.accelerator.num_processes)))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """Runs PPO for `max_steps` steps (see `PPOConfig`), resuming from a checkpoint if given."""
        args = self.args
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {args.output_dir}")
        checkpoint = resume_from_checkpoint or None
        if checkpoint:
            self.load_checkpoint_weights(checkpoint)
        self.is_in_train = True
        max_steps = self._max_steps()
        world = self.accelerator.num_processes
        episodes_per_step = args.rollout_batch_size * world
        optimizer_steps = max_steps * args.num_ppo_epochs * args.num_mini_batches

        if self.is_fsdp_enabled:
            # FSDP2 per role (sharding.py), then the optimiser over the sharded parameters.
            shard_roles(
                self.accelerator,
                self.policy,
                self.critic,
                self.ref_model,
                list(args.fsdp_config.get("transformer_layer_cls_to_wrap") or []),
            )
            held, total = local_and_total_numel(self.policy)
            log.info(
                "dist=fsdp: policy, critic%s sharded over %d processes (this one holds %d of the policy's %d "
                "parameters)",
                " and reference" if self.ref_model is not None else "",
                self.accelerator.num_processes,
                held,
                total,
            )
            self.create_optimizer()
            # (accelerate's `prepare` would shard the whole module once more, as one root.)
            model, self.optimizer = self.model, self.accelerator.prepare_optimizer(self.optimizer)
        else:
            if self.is_deepspeed_enabled:
                # The DeepSpeed config's model-sized "auto" values, from the policy's config (the
                # two-network module has none; transformers' Trainer does this in deepspeed_init).
                args.hf_deepspeed_config.trainer_config_finalize(args, self.policy, optimizer_steps)
            self.create_optimizer()
            model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = model
        self.create_scheduler(num_training_steps=optimizer_steps)

        self.state = TrainerState(
            stateful_callbacks=[
                cb
                for cb in self.callback_handler.callbacks + [self.control]
                if isinstance(cb, ExportableState)
            ]
        )
        self.state.train_batch_size = episodes_per_step
        self.state.compute_steps(args, max_steps)
        if checkpoint:
            self._resume_state(checkpoint)
        n_prompts = len(self._train_prompt_ids)
        prompts_per_step = args.rollout_prompts * world
        self.state.init_training_references(self, max_steps, max_steps * prompts_per_step / n_prompts, trial)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))

        start_time, first_step = time.time(), self.state.global_step
        self._log_buffer.clear()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and self.state.global_step == 0:
            self.evaluate()  # as transformers' Trainer does: the starting policy's numbers
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            rows = self._batch_rows(self.state.global_step)
            prompt_ids = [self._train_prompt_ids[r] for r in rows]
            experience, metrics = self.experience_maker.make_experience(prompt_ids, rows, self.train_dataset)
            metrics.update(self.ppo_update(model, experience))
            metrics = self._reduce(metrics)
            metrics.update(self.experience_maker.user_metrics_of_step())
            self.kl_ctl.update(metrics["kl"], episodes_per_step)
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * prompts_per_step / n_prompts
            for key, value in metrics.items():
                self._log_buffer[key].append(value)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._log_evaluate_save()

        steps_run = self.state.global_step - first_step
        losses = self.state.log_history
        train_loss = [e["loss"] for e in losses if "loss" in e]
        output_metrics = speed_metrics(
            "train", start_time, num_samples=steps_run * episodes_per_step, num_steps=steps_run
        )
        output_metrics["train_loss"] = sum(train_loss) / len(train_loss) if train_loss else float("nan")
        self.log(output_metrics)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, output_metrics["train_loss"], output_metrics)

    def _reduce(self, metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Averages the step's tensor metrics over processes; one device-to-host copy for all of them."""
        keys = sorted(k for k, v in metrics.items() if isinstance(v, torch.Tensor))
        out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        if keys:
            device = self.accelerator.device
            stacked = torch.stack([metrics[k].detach().float().to(device).reshape(()) for k in keys])
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked, reduction="mean")
            out.update(zip(keys, stacked.tolist(), strict=True))
        return out

    def _log_evaluate_save(self) -> None:
        if self.control.should_log and self._log_buffer:
            logs = {k: sum(v) / len(v) for k, v in self._log_buffer.items()}
            logs["learning_rate"] = self.current_learning_rate()
            logs["episode"] = (
                self.state.global_step * self.args.rollout_batch_size * self.accelerator.num_processes
            )
            self._log_buffer.clear()
            self.log(logs)
        if self.control.should_evaluate:
            self.evaluate()
        if self.control.should_save:
            self.save_checkpoint_now()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
