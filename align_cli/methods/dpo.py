"""Direct Preference Optimization (seed section 3.1) with TRL's DPOTrainer.

    align train method=dpo [method.args.beta=0.1] [peft=lora]

Data (`preference`): the seed's `instruction`/`input`/`chosen`/`rejected`, or TRL's
`prompt`/`chosen`/`rejected` (plain or conversational).

Loss: −log σ(β·log π(y+|x)/π_ref(y+|x) − β·log π(y−|x)/π_ref(y−|x)). The reference model is
a frozen copy of the starting model; with `peft=lora` it is the same model with its adapters
disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

SUMMARY_KEYS = ["rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"]


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import DPOConfig

    return DPOConfig


def build(ctx):
    from trl import DPOTrainer

    return ctx.trl_trainer(DPOTrainer, config_class())
