"""Our PPO trainer: a `transformers.Trainer` whose `train()` runs the RLHF loop.

Each step (one `global_step`):

1. rollout: sample responses to a batch of prompts with `generate` (temperature, top-p,
   top-k, `max_new_tokens`, stopping at EOS); score them with the rewards; run the policy,
   the reference and the critic once over the sampled tokens (no gradient) for log pi_old,
   log pi_ref and V_old;
2. advantages: per-token reward = -beta * KL(pi || pi_ref), the score added at the last real
   token (`core.shaped_rewards`); GAE advantages and returns (`core.gae`), whitened;
3. update: `num_ppo_epochs` passes over the batch in mini-batches (one optimiser step each,
   gradient accumulation over micro-batches): clipped surrogate + vf_coef * clipped value
   loss - entropy_coef * entropy (`losses.py`);
4. bookkeeping: the KL controller, metrics, and transformers' callbacks, which drive logging,
   the progress bar, `report_to`, evaluation and checkpoints exactly as for other trainers.

The policy and the critic train as one module (`PolicyAndCritic`) with one optimiser. The
reference is a frozen copy of the initial policy, or, with LoRA, the policy with its adapter
switched off (no second copy). Every reward function, reward models included, gets the
decoded text with TRL's reward-function signature (`reward_model_input=tokens` lets a reward model
that shares the policy's tokenizer read the sampled token ids instead, as TRL's PPO did).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, speed_metrics

from ..errors import AlignError
from .config import PPOConfig
from .core import (
    AdaptiveKLController,
    FixedKLController,
    ScoreNormalizer,
    entropy_from_logits,
    gae,
    last_token_index,
    masked_mean,
    masked_whiten,
    shaped_rewards,
    token_logprobs,
)
from .experience import Experience
from .losses import entropy_bonus, policy_loss, value_loss

log = logging.getLogger("align.ppo")

CRITIC_DIR = "critic"  # inside a checkpoint: the critic, needed to resume
PPO_STATE_NAME = "ppo_state.json"  # inside a checkpoint: the KL controller
SAMPLES_NAME = "samples.jsonl"  # in the run folder: the eval-time sample table
TRAINING_ARGS_NAME = "training_args.bin"


# --- model plumbing -------------------------------------------------------------------------


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its LoRA layers stay injected), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def value_head(model: nn.Module) -> nn.Module:
    """The one-output head of a sequence-classification model (`score` for most decoders)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no score/classifier head to read values or rewards from")


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def disable_dropout(model: nn.Module) -> None:
    """Dropout would make pi_old (rollout) and pi_theta (update) differ for no reason; turn it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def forward_inputs(sequences: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs whose last R positions predict the R response tokens.

    The last token is dropped (nothing is predicted from it); position ids count real tokens
    only, as `generate` does for left-padded prompts. (B, T) -> (B, T - 1) tensors.
    """
    mask = attention_mask[:, :-1]
    return {
        "input_ids": sequences[:, :-1],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def critic_values(critic: nn.Module, inputs: dict[str, torch.Tensor], response_length: int) -> torch.Tensor:
    """V(s_t) for the R response positions: the head applied to each position's last hidden state. -> (B, R)."""
    model = unwrap_peft(critic)
    hidden = backbone(model)(**inputs, use_cache=False).last_hidden_state[:, -response_length:]  # (B, R, H)
    return value_head(model)(hidden).squeeze(-1).float()


@torch.no_grad()
def reward_model_scores(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """A reward model's score of each (prompt + response) token row. -> (B,).

    Read where the model's own forward reads it, so the score is the one it was trained to give:
    at the last token that is not its pad token. That is the last real token (`last_index`),
    or the one before it when the pad token is the EOS that ends the response.
    """
    model = unwrap_peft(model)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        real = attention_mask.bool() & (sequences != pad)
        positions = torch.arange(sequences.shape[1], device=sequences.device)
        last_index = torch.minimum((positions * real).argmax(-1), last_index)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(model)(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # (B, H)
    return value_head(model)(picked).squeeze(-1).float()


@contextmanager
def sampling_only(model: nn.Module, config: GenerationConfig):
    """Makes `config` the whole generation config of `model` (and of the model inside a PeftModel).

    `generate` fills every field left unset with the model's own `generation_config`: a
    checkpoint's repetition penalty, `min_new_tokens` or suppressed tokens would then reshape
    the sampling distribution, and the log-probs PPO scores (softmax(logits / T)) would no longer
    be the behaviour policy's. With a bare config, only what `config` sets applies.
    """
    holders = [
        m for m in {id(m): m for m in (model, unwrap_peft(model))}.values() if hasattr(m, "generation_config")
    ]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = copy.deepcopy(config)
    try:
        yield
    finally:
        for m, old in zip(holders, saved, strict=True):
            m.generation_config = old


class PolicyAndCritic(nn.Module):
    """The two trained networks as one module: one optimiser, one `accelerator.prepare`, one DDP wrapper."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits (B, R, V) and critic values (B, R) at the response positions."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        # logits_to_keep: the LM head (often the largest matmul) runs on response positions only.
        logits = self.policy(**inputs, logits_to_keep=response_length, use_cache=False).logits
        return logits, critic_values(self.critic, inputs, response_length)


def _tied_names(module: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def load_saved_weights(module: nn.Module, folder: str) -> None:
    """Loads what `save_pretrained` wrote to `folder` (a full model or a LoRA adapter) into `module`."""
    from safetensors.torch import load_file

    if hasattr(module, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(os.path.join(folder, "adapter_model.safetensors")))
        return
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(module, folder, strict=False)
        return
    result = module.load_state_dict(load_file(path), strict=False)
    missing = set(result.missing_keys) - _tied_names(module)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder} does not match the model: missing {sorted(missing)[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _with_lora(model: nn.Module, peft_config: Any, args: PPOConfig) -> nn.Module:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(args.activation_checkpointing)
        )
    return get_peft_model(model, peft_config)


def _is_quantized(model: nn.Module | None) -> bool:
    return model is not None and getattr(model, "quantization_method", None) is not None


# --- the trainer ----------------------------------------------------------------------------


class PPOTrainer(Trainer):
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
    ):
        if not reward_funcs:
            raise ValueError("PPO needs at least one reward function or reward model")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_funcs)} reward functions")
        if processing_class.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        if ref_model is None and peft_config is None and not hasattr(policy, "peft_config"):
            ref_model = copy.deepcopy(policy)  # before any training touches the weights
        if peft_config is not None:
            policy = _with_lora(policy, peft_config, args)
        if critic_peft_config is not None:
            critic = _with_lora(critic, critic_peft_config, args)
        for module in (policy, critic, ref_model):
            if module is not None:
                disable_dropout(module)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        if args.activation_checkpointing:
            for module in (policy, critic):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        super().__init__(
            model=PolicyAndCritic(policy, critic),
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )
        device = self.accelerator.device
        self.ref_model = ref_model
        if ref_model is not None and not _is_quantized(ref_model):
            ref_model.to(device)
        self.reward_funcs = list(reward_funcs)
        for func in self.reward_funcs:
            if hasattr(func, "to"):
                func.to(device)
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(list(weights), dtype=torch.float32)
        self.reward_names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(self.reward_funcs)]
        # reward_model_input=tokens: reward models read our token ids as sampled (no decode/re-encode).
        self._token_reward_models: dict[int, nn.Module] = {}
        if args.reward_model_input == "tokens":
            vocab = processing_class.get_vocab()
            for i, func in enumerate(self.reward_funcs):
                if not isinstance(getattr(func, "model", None), nn.Module):
                    continue
                if getattr(func, "tokenizer", None) is None or func.tokenizer.get_vocab() != vocab:
                    raise AlignError(
                        f"method.args.reward_model_input=tokens: reward model {self.reward_names[i]} has another "
                        "tokenizer than the policy, so it cannot read the policy's tokens; use text"
                    )
                self._token_reward_models[i] = func.model

        if args.kl_target is not None:
            self.kl_ctl: FixedKLController = AdaptiveKLController(
                args.kl_coef, args.kl_target, args.kl_horizon
            )
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.score_norm = ScoreNormalizer(args.score_norm)

        tok = processing_class
        stop_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        policy_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        stop_ids |= set(
            policy_eos if isinstance(policy_eos, list) else [policy_eos] if policy_eos is not None else []
        )
        if not stop_ids:
            raise AlignError("the tokenizer has no EOS token: PPO needs one to know where a response ends")
        self.stop_token_ids = torch.tensor(sorted(stop_ids), device=device)
        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_id=sorted(stop_ids),
            pad_token_id=tok.pad_token_id,
            use_cache=True,
        )
        self._train_prompt_ids = self._tokenize_prompts(train_dataset)
        self._eval_prompt_ids = self._tokenize_prompts(eval_dataset) if eval_dataset is not None else None
        self._permutations: dict[int, list[int]] = {}
        self._shuffle = torch.Generator().manual_seed(args.seed)
        self._log_buffer: dict[str, list[float]] = defaultdict(list)
        # What reward functions hand to TRL's `log_metric` / `log_extra` (as under GRPO).
        self._user_metrics: dict[str, list[float]] = defaultdict(list)
        self._user_extra: dict[str, list[Any]] = defaultdict(list)
        self.probe = probe

    # --- placement, data --------------------------------------------------------------------

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        # bitsandbytes models cannot be moved with .to(); place the others one by one.
        for part in (model.policy, model.critic):
            if not _is_quantized(unwrap_peft(part)):
                part.to(device)

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def critic(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).critic

    def _tokenize_prompts(self, dataset: Any) -> list[list[int]]:
        """Token ids of every prompt (chat template with the generation prompt for messages)."""
        tok = self.processing_class
        prompts = dataset["prompt"]
        if prompts and isinstance(prompts[0], list):
            texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(list(prompts))["input_ids"]
        if self.args.max_length:
            # Cutting a prompt would hide part of it from the policy but not from the rewards.
            limit = self.args.max_length - self.args.max_new_tokens
            long = [i for i, row in enumerate(ids) if len(row) > limit]
            if long:
                raise AlignError(
                    f"{len(long)} of {len(ids)} prompts are longer than max_length - max_new_tokens = "
                    f"{self.args.max_length} - {self.args.max_new_tokens} = {limit} tokens (first: row "
                    f"{long[0]}, {len(ids[long[0]])} tokens): raise model.max_length or shorten these prompts"
                )
        return ids

    def _batch_rows(self, step: int) -> list[int]:
        """Dataset rows of this process's rollout batch at `step`: a fresh shuffle per pass over the data.

        A pure function of the step, so a resumed run samples exactly the prompts it would have.
        """
        n = len(self._train_prompt_ids)
        size = self.args.rollout_batch_size
        start = (step * self.accelerator.num_processes + self.accelerator.process_index) * size
        rows = []
        for pos in range(start, start + size):
            epoch, i = divmod(pos, n)
            if epoch not in self._permutations:
                gen = torch.Generator().manual_seed(self.args.seed + epoch)
                self._permutations = {epoch: torch.randperm(n, generator=gen).tolist(), **self._permutations}
                for old in [e for e in self._permutations if e < epoch - 1]:
                    del self._permutations[old]
            rows.append(self._permutations[epoch][i])
        return rows

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.processing_class.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        device = self.accelerator.device
        return ids.to(device), mask.to(device)

    # --- rollout ----------------------------------------------------------------------------

    def _reference_context(self):
        return self.policy.disable_adapter() if self.ref_model is None else nullcontext()

    @torch.no_grad()
    def _sample(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generates one response per prompt.

        Returns:
            sequences (B, P + R), attention_mask (B, P + R) and response_mask (B, R) float, with
            every token after a response's first stop token replaced by padding and masked.
        """
        policy = self.policy
        prompts, prompt_mask = self._left_pad(prompt_ids)  # (B, P)
        chunk = self.args.rollout_forward_batch_size or len(prompt_ids)
        pieces = []
        was_training = policy.training
        policy.eval()  # also lets generate keep its KV cache under activation checkpointing
        with self.accelerator.autocast(), sampling_only(policy, self.generation_config):
            for s in range(0, len(prompt_ids), chunk):
                out = policy.generate(
                    input_ids=prompts[s : s + chunk],
                    attention_mask=prompt_mask[s : s + chunk],
                    generation_config=self.generation_config,
                )
                pieces.append(out[:, prompts.shape[1] :])
        policy.train(was_training)
        pad = self.processing_class.pad_token_id
        width = max(p.shape[1] for p in pieces)
        responses = torch.cat(
            [nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces]
        )  # (B, R)
        is_stop = torch.isin(responses, self.stop_token_ids).long()
        after_stop = (is_stop.cumsum(1) - is_stop) > 0  # strictly after the first stop token
        responses = responses.masked_fill(after_stop, pad)
        response_mask = (~after_stop).float()
        sequences = torch.cat([prompts, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, (~after_stop).long()], dim=1)
        return sequences, attention_mask, response_mask

    def _log_metric(self, name: str, value: float) -> None:
        self._user_metrics[name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self._user_extra[column].extend(values)

    def _user_metrics_of_step(self) -> dict[str, float]:
        """The step's `log_metric` values, each averaged (over calls, then over processes)."""
        local = {name: sum(v) / len(v) for name, v in self._user_metrics.items() if v}
        self._user_metrics.clear()
        self._user_extra.clear()  # training completions have no table; evaluation's keep theirs
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = defaultdict(list)
            for part in gather_object([local]):
                for name, value in part.items():
                    merged[name].append(value)
            local = {name: sum(v) / len(v) for name, v in merged.items()}
        return local

    @torch.no_grad()
    def _score(
        self,
        rows: list[int],
        dataset: Any,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Scores each response with every reward function.

        Returns:
            `(scores (B,), per_function (B, F) with nan where a function abstained, completion texts)`.
        """
        tok = self.processing_class
        width = response_mask.shape[1]
        lengths = response_mask.sum(1).long().tolist()
        response_ids = [row[:n] for row, n in zip(sequences[:, -width:].tolist(), lengths, strict=True)]
        texts = tok.batch_decode(response_ids, skip_special_tokens=True)
        batch = dataset[rows]
        prompts = batch["prompt"]
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        last = sequences.shape[1] - width + last_token_index(response_mask)
        per_func = torch.full((len(rows), len(self.reward_funcs)), float("nan"))
        for i, func in enumerate(self.reward_funcs):
            if i in self._token_reward_models:
                with self.accelerator.autocast():
                    values = reward_model_scores(
                        self._token_reward_models[i], sequences, attention_mask, last
                    )
                per_func[:, i] = values.float().cpu()
                if not torch.isfinite(per_func[:, i]).any():  # as Reward.__call__ does for the others
                    from ..rewards import RewardFailed

                    raise RewardFailed(
                        f"reward.{self.reward_names[i]} scored no completion of a batch with a finite value"
                    )
            else:
                out = func(
                    prompts=prompts,
                    completions=completions,
                    completion_ids=response_ids,
                    trainer_state=self.state,
                    log_metric=self._log_metric,
                    log_extra=self._log_extra,
                    **columns,
                )
                per_func[:, i] = torch.tensor([float("nan") if v is None else float(v) for v in out])
        scores = (per_func * self.reward_weights).nansum(dim=1)  # an abstaining function adds 0
        return scores.to(sequences.device), per_func, texts

    def _penalize_missing_eos(
        self, scores: torch.Tensor, sequences: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores less `missing_eos_penalty` for responses cut off before a stop token; and which ended."""
        has_eos = torch.isin(sequences[:, -width:], self.stop_token_ids).any(1)
        if self.args.missing_eos_penalty:
            scores = scores - self.args.missing_eos_penalty * (~has_eos).to(scores.dtype)
        return scores, has_eos

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the sampling distribution (temperature applied), float32."""
        logits = logits.float()
        return logits if self.args.temperature == 1.0 else logits / self.args.temperature

    @torch.no_grad()
    def _logprobs_values(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int
    ) -> dict[str, torch.Tensor]:
        """log pi_old, log pi_ref, V_old and the policy's entropy at the sampled positions, each (B, R)."""
        policy, critic = self.policy, self.critic
        chunk = self.args.rollout_forward_batch_size or sequences.shape[0]
        outs: dict[str, list[torch.Tensor]] = defaultdict(list)
        with self.accelerator.autocast():
            for s in range(0, sequences.shape[0], chunk):
                inputs = forward_inputs(sequences[s : s + chunk], attention_mask[s : s + chunk])
                tokens = sequences[s : s + chunk, -width:]
                logits = self._scaled(policy(**inputs, logits_to_keep=width, use_cache=False).logits)
                outs["logprobs"].append(token_logprobs(logits, tokens))
                # Measured here, once per rollout, rather than on every micro-batch of every epoch.
                outs["entropy"].append(entropy_from_logits(logits))
                with self._reference_context():
                    ref = self.ref_model if self.ref_model is not None else policy
                    logits = self._scaled(ref(**inputs, logits_to_keep=width, use_cache=False).logits)
                outs["ref_logprobs"].append(token_logprobs(logits, tokens))
                outs["values"].append(critic_values(critic, inputs, width))
        return {key: torch.cat(parts) for key, parts in outs.items()}

    @torch.no_grad()
    def make_experience(self, rows: list[int]) -> tuple[Experience, dict[str, torch.Tensor]]:
        """Samples, scores and evaluates one rollout batch; returns it with its metrics."""
        args = self.args
        sequences, attention_mask, mask = self._sample([self._train_prompt_ids[r] for r in rows])
        width = mask.shape[1]
        scores, per_func, texts = self._score(rows, self.train_dataset, sequences, attention_mask, mask)
        scores, has_eos = self._penalize_missing_eos(scores, sequences, width)
        forward = self._logprobs_values(sequences, attention_mask, width)
        logprobs, ref_logprobs, values = (
            forward["logprobs"],
            forward["ref_logprobs"],
            forward["values"] * mask,
        )
        beta = self.kl_ctl.value
        # The score on the starting policy's scale (score_norm=init), so beta means the same for any
        # reward model; the logged `score` stays the raw one.
        if self.score_norm.mode != "none" and self.score_norm.mean is None:
            self.score_norm.fit(self.accelerator.gather(scores))  # one m, s for every process
        shaped_scores = self.score_norm(scores)
        rewards, kl = shaped_rewards(shaped_scores, logprobs, ref_logprobs, mask, beta, args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        experience = Experience(
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=mask,
            logprobs=logprobs * mask,
            ref_logprobs=ref_logprobs * mask,
            values=values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            scores=scores,
        )
        kl_per_response = kl.sum(1)  # (B,)
        metrics = {
            "score": scores.mean(),
            "score_std": scores.std() if len(scores) > 1 else torch.zeros((), device=scores.device),
            "kl": kl_per_response.mean(),
            "non_score_reward": (-beta * kl_per_response).mean(),
            "rlhf_reward": (shaped_scores - beta * kl_per_response).mean(),  # what PPO maximises
            "kl_coef": beta,  # a float: the same on every process
            "response_length": mask.sum(1).mean(),
            "eos_rate": has_eos.float().mean(),
            "value_mean": masked_mean(values, mask),
            "entropy": masked_mean(forward["entropy"], mask),
        }
        for i, name in enumerate(self.reward_names):
            metrics[f"rewards/{name}/mean"] = per_func[:, i].nanmean()
        metrics.update(self._diagnostics(rows, texts, kl, values, returns, mask))
        return experience, metrics

    def _diagnostics(self, rows, texts, kl, values, returns, mask) -> dict[str, torch.Tensor]:
        """The collapse watch's metrics of one rollout (align_cli/diagnostics.py), as tensors so
        that they are averaged over processes like the others."""
        from ..diagnostics import batch_metrics, explained_variance

        device = mask.device
        out = {
            "kl_per_token": kl.sum() / mask.sum().clamp(min=1),
            "value_explained_variance": explained_variance(values, returns, mask),
        }
        prompts = self.train_dataset[rows]["prompt"]
        for key, value in batch_metrics(prompts, texts).items():
            out[key] = torch.tensor(value, device=device)
        if self.probe is not None:
            out.update({k: torch.tensor(v, device=device) for k, v in self.probe.metrics().items()})
        return out

    # --- update -----------------------------------------------------------------------------

    def ppo_loss(self, model: nn.Module, part: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on one micro-batch: policy + vf_coef * value - entropy_coef * entropy."""
        args = self.args
        width = part.response_mask.shape[1]
        logits, values = model(**forward_inputs(part.sequences, part.attention_mask), response_length=width)
        logits = self._scaled(logits)
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
        """`num_ppo_epochs` passes over the rollout batch; returns the mean of each metric.

        Each mini-batch's loss is the mean over its response tokens, however it is split into
        micro-batches (see `training_step`). So the split is free, and rows of similar length go
        together, which cuts the padding computed.
        """
        args = self.args
        model.train()
        self._micro_metrics: list[dict[str, torch.Tensor]] = []
        grad_norms = []
        micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        # Reseeded from the step, so a resumed run shuffles exactly as an uninterrupted one.
        self._shuffle.manual_seed(args.seed * 1_000_003 + self.state.global_step)
        lengths = experience.attention_mask.sum(1)  # (B,) real tokens per row
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(experience), generator=self._shuffle).to(lengths.device)
            for m in range(args.num_mini_batches):
                mini = order[m * args.mini_batch_size : (m + 1) * args.mini_batch_size]
                mini = mini[torch.argsort(lengths[mini], stable=True)]
                tokens = experience.response_mask[mini].sum().clamp(min=1)
                for a in range(accumulation):
                    part = experience.select(mini[a * micro : (a + 1) * micro])
                    # Gradients are all-reduced once per optimiser step, not per micro-batch.
                    sync = a == accumulation - 1
                    with nullcontext() if sync else self.accelerator.no_sync(model):
                        self.training_step(model, part, tokens)
                if args.max_grad_norm and args.max_grad_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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
        if grad_norms:
            out["grad_norm"] = torch.stack(grad_norms).mean()
        return out

    # --- the loop ---------------------------------------------------------------------------

    def _max_steps(self) -> int:
        args = self.args
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        episodes = args.total_episodes or math.ceil(args.num_train_epochs * len(self._train_prompt_ids))
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
            self._load_from_checkpoint(checkpoint)
        self.is_in_train = True
        max_steps = self._max_steps()
        world = self.accelerator.num_processes
        episodes_per_step = args.rollout_batch_size * world

        self.create_optimizer()
        model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = model
        self.create_scheduler(num_training_steps=max_steps * args.num_ppo_epochs * args.num_mini_batches)

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
            self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
            self._load_callback_state()
            self._load_optimizer_and_scheduler(checkpoint)
            self._load_rng_state(checkpoint)
            state_file = os.path.join(checkpoint, PPO_STATE_NAME)
            if os.path.exists(state_file):
                with open(state_file, encoding="utf-8") as f:
                    state = json.load(f)
                self.kl_ctl.load_state_dict(state["kl_controller"])
                if "score_norm" in state:
                    self.score_norm.load_state_dict(state["score_norm"])
        n_prompts = len(self._train_prompt_ids)
        self.state.init_training_references(self, max_steps, max_steps * episodes_per_step / n_prompts, trial)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))

        start_time, first_step = time.time(), self.state.global_step
        self._log_buffer.clear()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and self.state.global_step == 0:
            self.evaluate()  # as transformers' Trainer does: the starting policy's numbers
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            experience, metrics = self.make_experience(self._batch_rows(self.state.global_step))
            metrics.update(self.ppo_update(model, experience))
            metrics = self._reduce(metrics)
            metrics.update(self._user_metrics_of_step())
            self.kl_ctl.update(metrics["kl"], episodes_per_step)
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * episodes_per_step / n_prompts
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
            logs["learning_rate"] = self._get_learning_rate()
            logs["episode"] = (
                self.state.global_step * self.args.rollout_batch_size * self.accelerator.num_processes
            )
            self._log_buffer.clear()
            self.log(logs)
        if self.control.should_evaluate:
            self.evaluate()
        if self.control.should_save:
            self._save_checkpoint(self.model_wrapped, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    # --- evaluation: scores and the sample table --------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"):
        """Samples a response to every eval prompt, scores it, and appends the rows to samples.jsonl.

        Returns:
            `{prefix}_score`, `{prefix}_response_length`, `{prefix}_eos_rate` and one
            `{prefix}_rewards/<name>/mean` per reward function when there are several.
        """
        from ..rewards import message_text

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        prompt_ids = (
            self._eval_prompt_ids if dataset is self.eval_dataset else self._tokenize_prompts(dataset)
        )
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(rank, len(prompt_ids), world))
        size = self.args.per_device_eval_batch_size
        scores, lengths, eos, funcs, table = [], [], [], [], []
        for s in range(0, len(mine), size):
            rows = mine[s : s + size]
            sequences, attention_mask, mask = self._sample([prompt_ids[r] for r in rows])
            score, per_func, texts = self._score(rows, dataset, sequences, attention_mask, mask)
            # The same score as training's, so eval_score and score compare.
            score, has_eos = self._penalize_missing_eos(score, sequences, mask.shape[1])
            scores.append(score.float().cpu())
            lengths.append(mask.sum(1).cpu())
            eos.append(has_eos.float().cpu())
            funcs.append(per_func)
            prompts = dataset[rows]["prompt"]
            batch = [
                {"prompt": message_text(p), "completion": t, "score": round(float(v), 6)}
                for p, t, v in zip(prompts, texts, score.tolist(), strict=True)
            ]
            for column, values in self._user_extra.items():  # a reward's log_extra columns
                if len(values) == len(batch):
                    for row, value in zip(batch, values, strict=True):
                        row.setdefault(column, value)
            self._user_extra.clear()
            table += batch
        logged = self._user_metrics_of_step()  # log_metric during evaluation
        # Gathered as objects: ranks may hold different numbers of prompts, even none, and each
        # must join every collective call.
        local = (
            torch.cat(
                [
                    torch.stack([torch.cat(scores), torch.cat(lengths).float(), torch.cat(eos)], 1),
                    torch.cat(funcs),
                ],
                dim=1,
            ).tolist()
            if mine
            else []
        )
        if world > 1:
            from accelerate.utils import gather_object

            local, table = gather_object(local), gather_object(table)
        metrics: dict[str, float] = {}
        if local:
            every = torch.tensor(local, dtype=torch.float64)  # (N, 3 + F)
            metrics = {
                f"{metric_key_prefix}_score": every[:, 0].mean().item(),
                f"{metric_key_prefix}_response_length": every[:, 1].mean().item(),
                f"{metric_key_prefix}_eos_rate": every[:, 2].mean().item(),
            }
            if len(self.reward_funcs) > 1:
                for i, name in enumerate(self.reward_names):
                    metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = every[:, 3 + i].nanmean().item()
        metrics.update({f"{metric_key_prefix}_{name}": value for name, value in logged.items()})
        if self.args.should_save and table:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, SAMPLES_NAME), "a", encoding="utf-8") as f:
                for row in table:
                    f.write(json.dumps({"step": self.state.global_step, **row}, ensure_ascii=False) + "\n")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- saving and resuming ----------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the policy (full model or LoRA adapter) and tokenizer; checkpoints add the critic."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.policy.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if _internal_call:  # a checkpoint: resuming needs the critic too
            self.critic.save_pretrained(os.path.join(output_dir, CRITIC_DIR))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            from ..guard import write_json_atomic

            # A checkpoint is complete only with it (guard.checkpoint_problem): never half written.
            write_json_atomic(
                os.path.join(folder, PPO_STATE_NAME),
                {"kl_controller": self.kl_ctl.state_dict(), "score_norm": self.score_norm.state_dict()},
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        wrapper = self.accelerator.unwrap_model(model or self.model)
        load_saved_weights(wrapper.policy, resume_from_checkpoint)
        load_saved_weights(wrapper.critic, os.path.join(resume_from_checkpoint, CRITIC_DIR))
