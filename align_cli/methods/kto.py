"""Kahneman-Tversky Optimization (seed section 3.2) with TRL's KTOTrainer.

    align train method=kto [method.args.desirable_weight=1.0] [peft=lora]

Data (`kto`): the seed's `instruction`/`input`/`output`/`kto_tag` (true = desirable), or
TRL's `prompt`/`completion`/`label`. One answer and a binary label per row; no pairs needed.
The reference model is a frozen copy, or the base with adapters disabled under LoRA.
"""

from __future__ import annotations

SUMMARY_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "eval_rewards/margins"]


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import KTOConfig

    return KTOConfig


def build(ctx):
    from trl import KTOTrainer

    return ctx.trl_trainer(KTOTrainer, config_class())
