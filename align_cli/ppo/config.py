"""`PPOConfig`: the TrainingArguments that `method.args` fills for `method=ppo`.

A subclass of `transformers.TrainingArguments`, so logging, saving, optimiser, schedule,
precision and `report_to` mean what they mean for every other method, and an unknown key in
`method.args` is rejected by name (see `MethodContext.trl_config`).

Batch sizes, per process:

    micro-batch    = per_device_train_batch_size             one forward/backward
    mini-batch     = micro-batch * gradient_accumulation_steps   one optimiser step
    rollout batch  = mini-batch * num_mini_batches              responses sampled per PPO step
    prompts per rollout = rollout batch / samples_per_prompt     each sampled samples_per_prompt times

One training step (`global_step`) = one rollout batch sampled and scored, then
`num_ppo_epochs` passes over it in mini-batches (so num_ppo_epochs * num_mini_batches
optimiser steps). `max_steps` counts these PPO steps; without it, `total_episodes` (or
`num_train_epochs` passes over the prompts) sets how many responses (episodes) are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .core import GROUP_SCORES, KL_ESTIMATORS, SCORE_NORMS

# TRL's PPOConfig names for what is called otherwise here: an unknown key says which one it is.
TRL_NAMES = {
    "response_length": "max_new_tokens",
    "local_rollout_forward_batch_size": "rollout_forward_batch_size",
    "kl_estimator_type": "kl_estimator",
    "init_kl_coef": "kl_coef",
    "target": "kl_target",
    "horizon": "kl_horizon",
    "ppo_epochs": "num_ppo_epochs",
}


OLD_LOGPROBS = ("forward", "generation")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PPOConfig(TrainingArguments):
    """PPO's knobs on top of `transformers.TrainingArguments` (see the module docstring for batching)."""

    learning_rate: float = field(
        default=3e-6,
        metadata=_help("AdamW learning rate (the policy; the critic too unless critic_learning_rate)."),
    )
    critic_learning_rate: float | None = field(
        default=None,
        metadata=_help("The critic's learning rate (its own optimiser param groups); null: learning_rate."),
    )

    # --- rollout ------------------------------------------------------------------------------
    max_new_tokens: int = field(default=64, metadata=_help("Most tokens sampled per response."))
    max_length: int | None = field(
        default=None,
        metadata=_help(
            "Prompt + response tokens: a prompt longer than max_length - max_new_tokens is an error."
        ),
    )
    temperature: float = field(
        default=1.0, metadata=_help("Sampling temperature (also used to score log-probs).")
    )
    top_p: float = field(
        default=1.0, metadata=_help("Nucleus sampling mass; 1.0 samples from the whole vocabulary.")
    )
    top_k: int = field(default=0, metadata=_help("Sample among the k most likely tokens; 0 turns it off."))
    missing_eos_penalty: float | None = field(
        default=None,
        metadata=_help("Subtracted from the score of a response that reached max_new_tokens without EOS."),
    )
    rollout_forward_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Rows per generate / no-grad forward call during rollout; null: the whole rollout batch."
        ),
    )
    reward_model_input: str = field(
        default="text",
        metadata=_help(
            "What a reward model reads: text (prompt + completion laid out by its own tokenizer and chat "
            "template, as method=rm trains it) or tokens (the policy's prompt + response token ids as sampled, "
            "as TRL's PPO fed it; needs the policy's tokenizer)."
        ),
    )
    offload_reward_model: bool = field(
        default=False,
        metadata=_help(
            "Keep the reward models in CPU memory between rollouts and move them to the accelerator only "
            "while they score (frees their accelerator memory for generation and the update; a no-op on a CPU)."
        ),
    )
    old_logprobs: str = field(
        default="forward",
        metadata=_help(
            "Where log pi_old (and the logged entropy) come from: forward (a no-grad forward pass of the policy "
            "over each sampled sequence after generation, so the first PPO epoch starts at ratio 1 to float "
            "rounding) or generation (read off the logits generate already computed, one step's batch x "
            "vocabulary at a time: no extra pass, about 4 % of a step at 50M parameters and 256 new tokens; "
            "the KV-cached logits may differ from a full forward pass by float rounding, more under bf16)."
        ),
    )
    total_episodes: int | None = field(
        default=None,
        metadata=_help(
            "Responses to sample in all; null: num_train_epochs x dataset size x samples_per_prompt."
        ),
    )
    samples_per_prompt: int = field(
        default=1,
        metadata=_help(
            "Responses sampled per prompt in one rollout batch (which holds rollout batch / this many "
            "prompts); with group_score, the other responses to a prompt are its baseline."
        ),
    )
    group_score: str = field(
        default="none",
        metadata=_help(
            "none | center | zscore: each response's score relative to the other responses to its prompt, "
            "before the KL penalty and GAE. center subtracts the prompt's mean score (a per-prompt baseline, "
            "as REINFORCE with baseline / RLOO); zscore also divides by the prompt's score std (as GRPO), so a "
            "reward model's larger margins on some kinds of prompt do not push every prompt their way. "
            "Needs samples_per_prompt >= 2."
        ),
    )

    # --- PPO update ---------------------------------------------------------------------------
    num_ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout batch."))
    num_mini_batches: int = field(default=1, metadata=_help("Optimiser steps per pass over a rollout batch."))
    cliprange: float = field(default=0.2, metadata=_help("epsilon of the clipped surrogate."))
    cliprange_value: float = field(
        default=0.2, metadata=_help("How far a value may move from its rollout value.")
    )
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    entropy_coef: float = field(
        default=0.0, metadata=_help("Weight of the entropy bonus (0: measured only).")
    )
    gamma: float = field(default=1.0, metadata=_help("Discount factor of GAE."))
    lam: float = field(default=0.95, metadata=_help("lambda of GAE."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten the per-token rewards before GAE."))
    whiten_advantages: bool = field(
        default=True, metadata=_help("Whiten the advantages over the rollout batch.")
    )

    score_norm: str = field(
        default="none",
        metadata=_help(
            "none: the reward as scored | init: (score - m) / s with m, s the mean and std of the scores of the "
            "first rollout batch (the starting policy's), kept fixed after (Ziegler et al. 2019), so kl_coef "
            "weighs KL against a reward of unit scale whatever the reward model's scale."
        ),
    )

    # --- pretraining mix (PPO-ptx) -------------------------------------------------------------
    ptx_coef: float = field(
        default=0.0,
        metadata=_help(
            "gamma of InstructGPT's PPO-ptx objective: each optimiser step also minimises ptx_coef x the "
            "language-model loss on a batch of the ptx data (data.ptx_path: demonstrations in an SFT layout), "
            "which keeps what the policy could say, and keeps sampling it, while the reward moves it. 0: off."
        ),
    )
    ptx_batch_size: int | None = field(
        default=None, metadata=_help("ptx rows per optimiser step; null: the mini-batch size.")
    )

    # --- KL penalty ---------------------------------------------------------------------------
    kl_coef: float = field(
        default=0.05, metadata=_help("beta: weight of the per-token KL(pi || pi_ref) penalty.")
    )
    kl_estimator: str = field(
        default="k1", metadata=_help("k1 (log-ratio) or k3 (non-negative, lower variance).")
    )
    kl_target: float | None = field(
        default=None,
        metadata=_help(
            "Adaptive KL (Ziegler et al. 2019): steer beta so the per-response KL nears this; null: fixed beta."
        ),
    )
    kl_horizon: int = field(
        default=10000, metadata=_help("Episodes over which the adaptive beta moves by its step.")
    )

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be positive")
        if self.critic_learning_rate is not None and self.critic_learning_rate < 0:
            problems.append(f"critic_learning_rate={self.critic_learning_rate} must not be negative")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be 0 (off) or positive")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            problems.append(
                f"missing_eos_penalty={self.missing_eos_penalty} must be positive (it is subtracted)"
            )
        if self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            problems.append("num_ppo_epochs and num_mini_batches must be at least 1")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            problems.append("cliprange and cliprange_value must be positive")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"gamma={self.gamma} and lam={self.lam} must lie in [0, 1]")
        if self.reward_model_input not in ("text", "tokens"):
            problems.append(f"reward_model_input={self.reward_model_input!r} must be text or tokens")
        if self.old_logprobs not in OLD_LOGPROBS:
            problems.append(f"old_logprobs={self.old_logprobs!r} must be one of {', '.join(OLD_LOGPROBS)}")
        if self.samples_per_prompt < 1:
            problems.append(f"samples_per_prompt={self.samples_per_prompt} must be at least 1")
        elif self.rollout_batch_size % self.samples_per_prompt:
            problems.append(
                f"samples_per_prompt={self.samples_per_prompt} must divide the rollout batch "
                f"(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = "
                f"{self.rollout_batch_size})"
            )
        if self.group_score not in GROUP_SCORES:
            problems.append(f"group_score={self.group_score!r} must be one of {', '.join(GROUP_SCORES)}")
        elif self.group_score != "none" and self.samples_per_prompt < 2:
            problems.append(
                f"group_score={self.group_score} compares the responses to one prompt: "
                "set samples_per_prompt to 2 or more"
            )
        if self.score_norm not in SCORE_NORMS:
            problems.append(f"score_norm={self.score_norm!r} must be one of {', '.join(SCORE_NORMS)}")
        if self.ptx_coef < 0:
            problems.append(f"ptx_coef={self.ptx_coef} must not be negative (0 turns the ptx loss off)")
        if self.ptx_batch_size is not None and self.ptx_batch_size < 1:
            problems.append(f"ptx_batch_size={self.ptx_batch_size} must be at least 1, or null")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator={self.kl_estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
        if self.kl_coef < 0:
            problems.append(f"kl_coef={self.kl_coef} must not be negative")
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_horizon <= 0):
            problems.append("kl_target and kl_horizon must be positive")
        if self.kl_target is not None and self.kl_coef == 0:
            problems.append(
                "kl_target adapts kl_coef by multiplying it, so kl_coef=0 would stay 0: start it above 0"
            )
        if self.max_length is not None and self.max_length <= self.max_new_tokens:
            problems.append(f"max_length={self.max_length} leaves no room for a prompt beside max_new_tokens")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mini_batch_size(self) -> int:
        """Rows per optimiser step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_batch_size(self) -> int:
        """Responses sampled per PPO step on one process."""
        return self.mini_batch_size * self.num_mini_batches

    @property
    def rollout_prompts(self) -> int:
        """Distinct prompts per PPO step on one process."""
        return self.rollout_batch_size // max(1, self.samples_per_prompt)
