"""Group Relative Policy Optimization (seed section 3.3) with TRL's GRPOTrainer.

    align train method=grpo reward=length                     # a rule reward, sample prompts
    align train method=grpo reward=match method.advantage=rank       # `answer` column of the sample
    align train method=grpo reward=model reward.model.path=outputs/rm/<run> peft=lora

Data (`prompt`): the seed's `instruction`/`input`, or TRL's `prompt` (plain or conversational).
Every other column (e.g. `answer`) is kept and reaches the reward functions as a keyword
argument.

For each prompt x the policy samples a group of K = `method.args.num_generations`
completions, the rewards (`reward=`, see align_cli/rewards) score them, and each completion's
advantage says how it compares with its group; no value model (critic) is trained.
`method.advantage` picks how:

- `zscore` (TRL's default): A_i = (r_i - mean(r)) / std(r) over the group's weighted rewards;
- `rank` (the seed's form): A_i = (rank(r_i) - mean rank) / std(rank), ranks 1..K, ties
  sharing their average rank and an all-tied group getting 0 (align_cli/rewards/advantage.py).
  Only the order of the rewards matters, so reward scale and outliers do not.

The policy then follows TRL's clipped objective, with a KL penalty to the starting model
when `method.args.beta` > 0 (with `peft=lora` the reference is the model with adapters off).

`method.args.ptx_coef` with `data.ptx_path=<demonstrations>` adds the ptx loss of
InstructGPT's PPO-ptx to every training step (the policy's language-model loss on a batch of
them, logged as `ptx_loss`; align_cli/ppo/ptx.py), as for PPO.

Beside TRL's metrics (`entropy`, `kl` when beta > 0, `clip_ratio/*`, completion lengths),
every step logs the collapse watch's `distinct_1`/`distinct_2`, `identical_share`,
`top_completion_share` and, with a reward model, `probe/<text>` and `probe_reward`
(align_cli/diagnostics.py); `method.stop_on_collapse=true` stops at a collapse signature and
keeps the last checkpoint from before it as the run's model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from ..config import one_of
from ..diagnostics import GRPO_KEYS, Probe, batch_metrics
from ..rewards import message_text, rewards_for
from .base import RolloutSettings
from .ptx_data import ptx_dataset, ptx_problems

SUMMARY_KEYS = ["reward", "reward_std", "completions/mean_length", "frac_reward_zero_std", "eval_reward"]
# The collapse watch's metrics (align_cli/diagnostics.py), plotted in diagnostics.svg; TRL logs
# `kl` only when method.args.beta > 0.
DIAGNOSTIC_KEYS = [
    "entropy",
    "kl",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "distinct_2",
    "identical_share",
    "top_completion_share",
    "probe_reward",
]
ADVANTAGES = ("zscore", "rank")
# TRL options that only shape the z-score advantage; with `rank` they would be silently ignored.
ZSCORE_ONLY_ARGS = ("scale_rewards", "multi_objective_aggregation")


@dataclass
class Settings(RolloutSettings):
    """`method=grpo`: the advantage, plus the rollout methods' reward and collapse keys."""

    name: str = "grpo"
    dataset_type: str | None = "prompt"
    # instruction/input/answer, English and Chinese (grpo_prompts_plain.jsonl: prompt/answer)
    sample: str | None = "grpo_prompts.jsonl"
    advantage: str = (
        "zscore"  # zscore: TRL's group z-score of the rewards | rank: the seed's (rank - mean) / std
    )

    def __post_init__(self):
        one_of("advantage", self.advantage, ADVANTAGES, "zscore (TRL's) or rank (the seed's)")
        super().__post_init__()


def config_class():
    """The config dataclass that `method.args` fills: TRL's GRPOConfig plus the ptx loss's keys."""
    from .grpo_config import GRPOConfig

    return GRPOConfig


@functools.cache
def ptx_trainer(base: type) -> type:
    """`base` (a GRPOTrainer) whose training loss adds ptx_coef x the policy's language-model loss
    on a batch of demonstrations (`ptx_pairs`, see align_cli/ppo/ptx.py), logged as `ptx_loss`."""
    import torch

    from ..compat import trl_logged_metrics
    from ..ppo.ptx import demonstration_nll

    class PtxGRPOTrainer(base):
        ptx_pairs: list | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self.ptx_pairs or not model.training:
                return loss
            step = self.state.global_step
            if getattr(self, "_ptx_step", None) != step:
                # The step's rows, drawn once: reseeded per step, so a resumed run draws the same
                # ones; each of the step's micro-batches takes its share of them, in order.
                rank = self.accelerator.process_index
                self._ptx_step = step
                shuffle = torch.Generator().manual_seed(self.args.seed * 1_000_033 + 7919 * step + rank)
                # The Trainer sets this per optimiser step (fewer at an epoch's end).
                parts = self.current_gradient_accumulation_steps
                total = self.args.ptx_batch_size or self.args.per_device_train_batch_size * parts
                rows = torch.randint(len(self.ptx_pairs), (total,), generator=shuffle).tolist()
                self._ptx_parts = [rows[i * total // parts : (i + 1) * total // parts] for i in range(parts)]
                self._ptx_part = 0
                # Completion tokens of the step's rows (nothing is cut: max_length None below).
                self._ptx_tokens = sum(len(self.ptx_pairs[r][1]) for r in rows)
            rows = self._ptx_parts[self._ptx_part % len(self._ptx_parts)]
            self._ptx_part += 1
            if not rows:  # fewer ptx rows in the step than micro-batches: this one has none
                return loss
            nll = demonstration_nll(
                self.accelerator.unwrap_model(model),
                self.ptx_pairs,
                rows,
                self.processing_class.pad_token_id,
                None,
                self.accelerator.device,
            )
            # GRPOTrainer scales its own loss for gradient accumulation (loss_is_scaled_for_ga), so
            # the Trainer adds the micro-batches' losses as they are. `nll` is a mean over this
            # part's completion tokens: weighted by its share of the step's tokens, the step
            # minimises ptx_coef x the mean over all of them, however the rows are split.
            share = sum(len(self.ptx_pairs[r][1]) for r in rows) / max(1, self._ptx_tokens)
            trl_logged_metrics(self, "train")["ptx_loss"].append(float(nll.detach()))
            return loss + self.args.ptx_coef * share * nll

    return PtxGRPOTrainer


@functools.cache
def rank_advantage_trainer() -> type:
    """GRPOTrainer whose advantages are the seed's within-group rank transform.

    TRL still scores the completions (its reward metrics and logs stay about the raw rewards);
    the advantages it returns are replaced by rank advantages of the weighted reward sum
    (the hook lives in compat.grpo_trainer_base, TRL offering none).
    """
    import torch

    from ..compat import grpo_trainer_base
    from ..rewards.advantage import rank_advantages

    class RankAdvantageGRPOTrainer(grpo_trainer_base()):
        def advantages_from(self, rewards_per_func):
            weights = self.reward_weights.to(rewards_per_func.device)  # (F,)
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)  # (N_all,)
            # A completion no reward function scored stays out of its group's ranking (advantage 0).
            rewards[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
            group = self.num_generations if self.model.training else self.num_generations_eval
            return rank_advantages(rewards, group)  # (N_all,)

    return RankAdvantageGRPOTrainer


class WatchedReward:
    """The run's first reward function, which also hands the collapse watch's batch metrics
    (align_cli/diagnostics.py) to TRL through the `log_metric` keyword TRL gives reward functions.

    TRL averages them over each logging step and logs them beside its own `entropy`, `kl` and
    `completions/mean_length`, so no TRL internals are touched. Everything else (the name, the
    scores, `to(device)`) is the wrapped function's.
    """

    def __init__(self, func, probe: Probe | None = None):
        self.func = func
        self.probe = probe
        self.__name__ = getattr(func, "__name__", "reward")

    def __getattr__(self, name):
        return getattr(self.func, name)

    def __call__(self, prompts, completions, **kwargs):
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            values = batch_metrics(prompts, [message_text(c) for c in completions])
            if self.probe is not None:
                values.update(self.probe.metrics())
            for key, value in values.items():
                if math.isfinite(value):  # TRL sums what it is given: a NaN would spoil the step
                    log_metric(key, value)
        return self.func(prompts=prompts, completions=completions, **kwargs)


def check(ctx, rows: list[dict] | None) -> list[str]:
    """Every check of the settings, the rewards and (given the training rows) the columns the
    rewards read that needs no weights; `align data validate` runs it too."""
    from ..rewards import reward_problems

    problems = []
    advantage = ctx.method["advantage"]  # `Settings` has checked it
    if "reward_weights" in ctx.args:
        problems.append(
            "method.args.reward_weights: set each reward's weight in the reward config instead "
            "(e.g. reward.length.weight=0.5)"
        )
    if advantage == "rank":
        problems += [
            f"method.args.{key} only shapes the zscore advantage; method.advantage=rank ranks the "
            "weighted reward sum within each group, so remove it or use method.advantage=zscore"
            for key in ZSCORE_ONLY_ARGS
            if key in ctx.args
        ]
    config = ctx.config
    # TRL takes both and fails later: an empty completion tensor, or logits divided by zero.
    length = getattr(config, "max_completion_length", None)
    if length is not None and length < 1:
        problems.append(
            f"method.args.max_completion_length={length} must be at least 1 (the most tokens sampled per completion)"
        )
    temperature = getattr(config, "temperature", 1.0)
    if temperature is not None and temperature <= 0:
        problems.append(
            f"method.args.temperature={temperature} must be positive: GRPO samples K different completions "
            "per prompt (e.g. 0.7 to 1.0)"
        )
    columns = sorted({k for r in rows for k in r}) if rows is not None else None
    return problems + reward_problems("grpo", ctx.reward, columns) + ptx_problems(ctx)


def build(ctx):
    # `check` (run by train.py before any model loads) has vetted the settings and rewards.
    advantage = ctx.method["advantage"]
    funcs, weights = rewards_for("grpo", ctx.reward, ctx.train_dataset.column_names)
    from trl import GRPOTrainer

    from ..callbacks import collapse_watch

    trainer_cls = rank_advantage_trainer() if advantage == "rank" else GRPOTrainer
    args = ctx.trl_config(config_class(), reward_weights=weights)
    demonstrations = ptx_dataset(ctx, args)
    if demonstrations is not None:
        trainer_cls = ptx_trainer(trainer_cls)
    policy = ctx.load_model()
    probe = Probe.for_rewards(funcs, ctx.train_dataset["prompt"])
    keys = GRPO_KEYS if probe is None else dataclasses.replace(GRPO_KEYS, reward=probe.reward_key)
    watch = collapse_watch(ctx.method, policy.config.vocab_size, keys)
    trainer = trainer_cls(
        model=policy,
        reward_funcs=[WatchedReward(funcs[0], probe), *funcs[1:]],
        args=args,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        peft_config=ctx.lora(),
        callbacks=[*ctx.callbacks, watch],
    )
    if demonstrations is not None:
        from ..ppo.ptx import tokenize_demonstrations

        trainer.ptx_pairs = tokenize_demonstrations(ctx.tokenizer, demonstrations)
    # Reward models are our callables, not modules TRL would place: put them beside the policy.
    for func in funcs:
        if hasattr(func, "to"):
            func.to(trainer.accelerator.device)
    return trainer
