"""The experience maker: one rollout batch, from prompts to advantages, with no Trainer.

generate (`sample`) -> score (`score`: the reward functions and reward models, less the
missing-EOS penalty) -> log pi_old, log pi_ref, V_old (`forward_passes`) -> shaped per-token
reward (score_norm, -beta * KL, the score at the last token) -> GAE advantages and returns:
`ExperienceMaker.make_experience` returns the `Experience` the update consumes, and its metrics.
The tensor maths lives in `core.py`; which module plays which role in `models.py`.

Shapes use B = rollout rows, P = prompt columns (left-padded), R = response columns
(right-padded after the first stop token), T = P + R.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from ..errors import AlignError
from .config import PPOConfig
from .core import (
    AdaptiveKLController,
    FixedKLController,
    ScoreNormalizer,
    entropy_from_logits,
    gae,
    group_relative,
    last_token_index,
    masked_mean,
    masked_whiten,
    shaped_rewards,
    token_logprobs,
)
from .models import (
    critic_values,
    forward_inputs,
    reference,
    reference_context,
    reward_model_scores,
    sampling_logits,
    sampling_only,
)
from .sharding import gathered_for_generation, is_sharded

log = logging.getLogger("align")


def can_offload(device: torch.device) -> bool:
    """Whether moving a model to CPU memory frees anything: only when the run computes elsewhere."""
    return device.type != "cpu"


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


def check_inputs(
    reward_funcs: Sequence[Callable], reward_weights: Sequence[float] | None, tokenizer: Any
) -> None:
    """Raises ValueError for what no rollout could work with (called before any model is built)."""
    if not reward_funcs:
        raise ValueError("PPO needs at least one reward function or reward model")
    if reward_weights is not None and len(reward_weights) != len(reward_funcs):
        raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_funcs)} reward functions")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token")


def kl_controller(args: PPOConfig) -> FixedKLController:
    """beta: adaptive when `kl_target` is set, else fixed at `kl_coef`."""
    if args.kl_target is not None:
        return AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    return FixedKLController(args.kl_coef)


class StepRecorder:
    """A logits processor that keeps, per generated token, log softmax(logits / T) of the token
    sampled and the entropy of softmax(logits / T): log pi_old without a second pass of the policy.

    `generate` runs the processors it is handed before its sampling warpers (temperature, top-k,
    top-p), so the scores seen here are the model's raw logits: the distribution PPO scores, not the
    truncated one sampled from (as the forward pass does). Step t's token is only known at step
    t + 1, so one step's (B, V) is kept between calls; `finish` reads the last token off the output.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []  # (B,) per recorded token
        self.entropy: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None  # the step before's logits / T, (B, V) float32

    def _pick(self, tokens: torch.Tensor) -> None:
        """Records the log-prob, under the last kept step, of `tokens` (B,): that step's samples."""
        self.logprobs.append(token_logprobs(self.last.unsqueeze(1), tokens.unsqueeze(1)).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self._pick(input_ids[:, -1])
        self.last = scores.float() / self.temperature  # a new tensor: later processors cannot change it
        self.entropy.append(entropy_from_logits(self.last))
        return scores

    def finish(self, responses: torch.Tensor) -> dict[str, torch.Tensor]:
        """`responses` (B, R'): generate's new columns. Returns logprobs and entropy, (B, R') each.

        Columns come from the output, not from the calls: generate may run one decoding step more
        than it returns and drop it (transformers' `DeferredStopCheck`, used on MPS), whose
        entropy is then cut; under `synced_gpus` a rank whose rows have all stopped steps on
        without calling the processors or adding columns.
        """
        width = responses.shape[1]
        steps = len(self.entropy)
        if 0 < steps <= width:
            self._pick(responses[:, steps - 1])
        self.last = None
        out = {}
        for key, parts in (("logprobs", self.logprobs), ("entropy", self.entropy)):
            parts = parts[:width]
            got = (
                torch.stack(parts, dim=1)
                if parts
                else responses.new_zeros((len(responses), 0), dtype=torch.float)
            )
            out[key] = nn.functional.pad(got, (0, width - got.shape[1]))
        return out


class ExperienceMaker:
    """Turns prompts into an `Experience`: sample, score, forward passes, shaped rewards, GAE.

    Args:
        policy: the causal LM that samples (as `prepare_roles` returned it).
        critic: the value model (a one-output sequence-classification model).
        ref_model: the frozen reference; None: the policy with its LoRA adapter off.
        tokenizer: the policy's tokenizer (with a pad token and an EOS token).
        reward_funcs: `f(prompts, completions, **columns) -> list[float | None]`; with
            `reward_model_input=tokens`, those with a `.model` and `.tokenizer` read the token ids.
        args: the `PPOConfig` (sampling, penalties, KL, GAE settings).
        accelerator: an `accelerate.Accelerator` (device, autocast, gather across processes).
        reward_weights: one weight per reward function (default 1.0 each).
        probe: degenerate texts scored by the reward model (`align_cli.diagnostics.Probe`), or None.
        trainer_state: returns what reward functions get as `trainer_state` (None alone).
    """

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module,
        ref_model: nn.Module | None,
        tokenizer: Any,
        reward_funcs: Sequence[Callable],
        args: PPOConfig,
        accelerator: Any,
        reward_weights: Sequence[float] | None = None,
        probe: Any = None,
        trainer_state: Callable[[], Any] = lambda: None,
    ):
        check_inputs(reward_funcs, reward_weights, tokenizer)
        self.policy, self.critic, self.ref_model = policy, critic, ref_model
        self.tokenizer, self.args, self.accelerator = tokenizer, args, accelerator
        self.probe, self.trainer_state = probe, trainer_state
        device = accelerator.device
        self.reward_funcs = list(reward_funcs)
        # offload_reward_model: the reward models wait in CPU memory and visit the device to score.
        self.offload = bool(args.offload_reward_model) and can_offload(device)
        if args.offload_reward_model and not self.offload:
            log.info(
                "method.args.offload_reward_model: the run computes on the CPU, so the reward models stay in "
                "CPU memory anyway (nothing to offload)"
            )
        for func in self.reward_funcs:
            if hasattr(func, "to"):
                func.to("cpu" if self.offload else device)
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(list(weights), dtype=torch.float32)
        self.reward_names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(self.reward_funcs)]
        # reward_model_input=tokens: reward models read our token ids as sampled (no decode/re-encode).
        self.token_reward_models: dict[int, nn.Module] = {}
        if args.reward_model_input == "tokens":
            vocab = tokenizer.get_vocab()
            for i, func in enumerate(self.reward_funcs):
                if not isinstance(getattr(func, "model", None), nn.Module):
                    continue
                if getattr(func, "tokenizer", None) is None or func.tokenizer.get_vocab() != vocab:
                    raise AlignError(
                        f"method.args.reward_model_input=tokens: reward model {self.reward_names[i]} has another "
                        "tokenizer than the policy, so it cannot read the policy's tokens; use text"
                    )
                self.token_reward_models[i] = func.model
        self.kl_ctl = kl_controller(args)
        self.score_norm = ScoreNormalizer(args.score_norm)

        stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        policy_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        stop_ids |= set(
            policy_eos if isinstance(policy_eos, list) else [policy_eos] if policy_eos is not None else []
        )
        if not stop_ids:
            raise AlignError("the tokenizer has no EOS token: PPO needs one to know where a response ends")
        self.stop_token_ids = torch.tensor(sorted(stop_ids), device=device)
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_id=sorted(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        # What reward functions hand to TRL's `log_metric` / `log_extra` (as under GRPO).
        self.user_metrics: dict[str, list[float]] = defaultdict(list)
        self.user_extra: dict[str, list[Any]] = defaultdict(list)

    # --- generate ---------------------------------------------------------------------------

    def left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids left-padded into (B, P) ids and attention mask, on the device."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        device = self.accelerator.device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def sample(
        self, prompt_ids: list[list[int]], record: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Generates one response per prompt.

        Returns:
            sequences (B, P + R), attention_mask (B, P + R) and response_mask (B, R) float, with
            every token after a response's first stop token replaced by padding and masked; and with
            `record`, the sampled tokens' log-probs and the entropies ({"logprobs", "entropy"}, each
            (B, R)) read off generate's own logits (`StepRecorder`), else None.
        """
        policy = self.policy
        prompts, prompt_mask = self.left_pad(prompt_ids)  # (B, P)
        chunk = self.args.rollout_forward_batch_size or len(prompt_ids)
        pieces = []
        was_training = policy.training
        policy.eval()  # also lets generate keep its KV cache under activation checkpointing
        # Sharded (dist=fsdp): the ranks gather the policy together and step together until every
        # rank's responses have stopped, so each runs the same forward passes (see sharding.py).
        synced = is_sharded(policy) and self.accelerator.num_processes > 1
        recorded: list[dict[str, torch.Tensor]] = []
        with (
            self.accelerator.autocast(),
            sampling_only(policy, self.generation_config),
            gathered_for_generation(policy),
        ):
            for s in range(0, len(prompt_ids), chunk):
                recorder = StepRecorder(self.args.temperature) if record else None
                out = policy.generate(
                    input_ids=prompts[s : s + chunk],
                    attention_mask=prompt_mask[s : s + chunk],
                    generation_config=self.generation_config,
                    synced_gpus=synced,
                    logits_processor=LogitsProcessorList([recorder]) if record else None,
                )
                pieces.append(out[:, prompts.shape[1] :])
                if record:
                    recorded.append(recorder.finish(pieces[-1]))
        policy.train(was_training)
        pad = self.tokenizer.pad_token_id
        width = max(p.shape[1] for p in pieces)
        responses = torch.cat(
            [nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces]
        )  # (B, R)
        steps = None
        if record:  # (B, R) each; columns past a chunk's last step are padding, masked below
            steps = {
                key: torch.cat([nn.functional.pad(r[key], (0, width - r[key].shape[1])) for r in recorded])
                for key in ("logprobs", "entropy")
            }
        is_stop = torch.isin(responses, self.stop_token_ids).long()
        after_stop = (is_stop.cumsum(1) - is_stop) > 0  # strictly after the first stop token
        responses = responses.masked_fill(after_stop, pad)
        response_mask = (~after_stop).float()
        sequences = torch.cat([prompts, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, (~after_stop).long()], dim=1)
        return sequences, attention_mask, response_mask, steps

    # --- score ------------------------------------------------------------------------------

    def log_metric(self, name: str, value: float) -> None:
        self.user_metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.user_extra[column].extend(values)

    def user_metrics_of_step(self) -> dict[str, float]:
        """The step's `log_metric` values, each averaged (over calls, then over processes)."""
        local = {name: sum(v) / len(v) for name, v in self.user_metrics.items() if v}
        self.user_metrics.clear()
        self.user_extra.clear()  # training completions have no table; evaluation's keep theirs
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = defaultdict(list)
            for part in gather_object([local]):
                for name, value in part.items():
                    merged[name].append(value)
            local = {name: sum(v) / len(v) for name, v in merged.items()}
        return local

    @contextmanager
    def reward_models_on_device(self):
        """Where the reward models score: on the device; with `offload_reward_model`, moved there
        for the duration and back to CPU memory after (a no-op otherwise)."""
        movable = [f for f in self.reward_funcs if hasattr(f, "to")] if self.offload else []
        for func in movable:
            func.to(self.accelerator.device)
        try:
            yield
        finally:
            for func in movable:
                func.to("cpu")

    @torch.no_grad()
    def score(
        self,
        rows: list[int],
        dataset: Any,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Scores each response with every reward function.

        Returns:
            `(scores (B,), per_function (B, F) with nan where a function abstained, completion texts)`.
        """
        width = response_mask.shape[1]
        lengths = response_mask.sum(1).long().tolist()
        response_ids = [row[:n] for row, n in zip(sequences[:, -width:].tolist(), lengths, strict=True)]
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        batch = dataset[rows]
        prompts = batch["prompt"]
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        last = sequences.shape[1] - width + last_token_index(response_mask)
        per_func = torch.full((len(rows), len(self.reward_funcs)), float("nan"))
        with self.reward_models_on_device():
            self._score_each(
                per_func, sequences, attention_mask, last, prompts, completions, response_ids, columns
            )
            if self.offload and self.probe is not None:
                self.probe.metrics()  # computed once (a frozen model): while the model is on the device
        scores = (per_func * self.reward_weights).nansum(dim=1)  # an abstaining function adds 0
        return scores.to(sequences.device), per_func, texts

    def _score_each(
        self, per_func, sequences, attention_mask, last, prompts, completions, response_ids, columns
    ):
        """Fills per_func (B, F) with each reward function's scores (nan where one abstained)."""
        for i, func in enumerate(self.reward_funcs):
            if i in self.token_reward_models:
                with self.accelerator.autocast():
                    values = reward_model_scores(self.token_reward_models[i], sequences, attention_mask, last)
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
                    trainer_state=self.trainer_state(),
                    log_metric=self.log_metric,
                    log_extra=self.log_extra,
                    **columns,
                )
                per_func[:, i] = torch.tensor([float("nan") if v is None else float(v) for v in out])

    def penalize_missing_eos(
        self, scores: torch.Tensor, sequences: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores less `missing_eos_penalty` for responses cut off before a stop token; and which ended."""
        has_eos = torch.isin(sequences[:, -width:], self.stop_token_ids).any(1)
        if self.args.missing_eos_penalty:
            scores = scores - self.args.missing_eos_penalty * (~has_eos).to(scores.dtype)
        return scores, has_eos

    # --- forward passes, rewards, advantages ------------------------------------------------

    @torch.no_grad()
    def forward_passes(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int, policy_pass: bool = True
    ) -> dict[str, torch.Tensor]:
        """log pi_old, log pi_ref, V_old and the policy's entropy at the sampled positions, each (B, R);
        with `policy_pass=False` (old_logprobs=generation) the policy's own pass is skipped and
        log pi_old and the entropy are left out."""
        policy, temperature = self.policy, self.args.temperature
        chunk = self.args.rollout_forward_batch_size or sequences.shape[0]
        outs: dict[str, list[torch.Tensor]] = defaultdict(list)
        with self.accelerator.autocast():
            for s in range(0, sequences.shape[0], chunk):
                inputs = forward_inputs(sequences[s : s + chunk], attention_mask[s : s + chunk])
                tokens = sequences[s : s + chunk, -width:]
                if policy_pass:
                    logits = policy(**inputs, logits_to_keep=width, use_cache=False).logits
                    logits = sampling_logits(logits, temperature)
                    outs["logprobs"].append(token_logprobs(logits, tokens))
                    # Measured here, once per rollout, rather than on every micro-batch of every epoch.
                    outs["entropy"].append(entropy_from_logits(logits))
                with reference_context(policy, self.ref_model):
                    ref = reference(policy, self.ref_model)
                    logits = sampling_logits(
                        ref(**inputs, logits_to_keep=width, use_cache=False).logits, temperature
                    )
                outs["ref_logprobs"].append(token_logprobs(logits, tokens))
                outs["values"].append(critic_values(self.critic, inputs, width))
        return {key: torch.cat(parts) for key, parts in outs.items()}

    @torch.no_grad()
    def make_experience(
        self, prompt_ids: list[list[int]], rows: list[int], dataset: Any
    ) -> tuple[Experience, dict[str, torch.Tensor]]:
        """Samples, scores and evaluates one rollout batch; returns it with its metrics.

        Args:
            prompt_ids: the token ids of the batch's prompts (`tokenize_prompts`).
            rows: their rows in `dataset`, whose other columns the reward functions read.
            dataset: the prompts' dataset.
        """
        args = self.args
        from_generation = args.old_logprobs == "generation"
        sequences, attention_mask, mask, recorded = self.sample(prompt_ids, record=from_generation)
        width = mask.shape[1]
        scores, per_func, texts = self.score(rows, dataset, sequences, attention_mask, mask)
        scores, has_eos = self.penalize_missing_eos(scores, sequences, width)
        forward = self.forward_passes(sequences, attention_mask, width, policy_pass=not from_generation)
        if from_generation:
            forward.update(recorded)
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
        shaped_scores = group_relative(self.score_norm(scores), args.samples_per_prompt, args.group_score)
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
        metrics.update(self.diagnostics(dataset[rows]["prompt"], texts, kl, values, returns, mask))
        return experience, metrics

    def diagnostics(self, prompts, texts, kl, values, returns, mask) -> dict[str, torch.Tensor]:
        """The collapse watch's metrics of one rollout (align_cli/diagnostics.py), as tensors so
        that they are averaged over processes like the others."""
        from ..diagnostics import batch_metrics, explained_variance

        device = mask.device
        out = {
            "kl_per_token": kl.sum() / mask.sum().clamp(min=1),
            "value_explained_variance": explained_variance(values, returns, mask),
        }
        for key, value in batch_metrics(prompts, texts).items():
            out[key] = torch.tensor(value, device=device)
        if self.probe is not None:
            out.update({k: torch.tensor(v, device=device) for k, v in self.probe.metrics().items()})
        return out
