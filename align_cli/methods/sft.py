"""Supervised fine-tuning (the seed's 监督微调 stage) with TRL's SFTTrainer.

    align train method=sft [data.path=my.jsonl] [peft=lora] [quant=4bit]

Data (`sft`): alpaca `instruction`/`input`/`output` (+ `system`, `history`), chat `messages`,
sharegpt `conversations`, or TRL's `prompt`/`completion`. The loss covers the answer tokens
only for prompt/completion rows (TRL's completion-only loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodSettings


@dataclass
class Settings(MethodSettings):
    """`method=sft`: no settings of its own beyond `method.args` (SFTConfig's)."""

    name: str = "sft"
    dataset_type: str | None = "sft"
    sample: str | None = "sft_alpaca.jsonl"


SUMMARY_KEYS = ["mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy"]


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import SFTConfig

    return SFTConfig


def build(ctx):
    from trl import SFTTrainer

    return ctx.trl_trainer(SFTTrainer, config_class())
