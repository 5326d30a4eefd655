"""Kahneman-Tversky Optimization (seed section 3.2) with TRL's KTOTrainer.

    align train method=kto [method.args.desirable_weight=1.0] [peft=lora]

Data (`kto`): the seed's `instruction`/`input`/`output`/`kto_tag` (true = desirable), or
TRL's `prompt`/`completion`/`label`. One answer and a binary label per row; no pairs needed.
The reference model is a frozen copy, or the base with adapters disabled under LoRA.

TRL's KTOTrainer reads the training rows in file order (its KL estimate pairs each row with
its neighbours in a fixed-order batch), so `seed` alone would change nothing: the rows are
shuffled once with `seed` before training, and that order is kept for every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodSettings


@dataclass
class Settings(MethodSettings):
    """`method=kto`: no settings of its own beyond `method.args` (KTOConfig's)."""

    name: str = "kto"
    dataset_type: str | None = "kto"
    sample: str | None = "kto.jsonl"


SUMMARY_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "eval_rewards/margins"]


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import KTOConfig

    return KTOConfig


def check(ctx, rows: list[dict] | None) -> list[str]:
    """Settings TRL accepts but that train nonsense; `align data validate` runs this too."""
    from .base import beta_problems

    return beta_problems(ctx.config)


def training_order(dataset, sampling_strategy: str, seed: int):
    """The training rows in the order KTOTrainer reads them: under its default `sequential`
    sampling the order is fixed (see the module docstring), so the seed picks it here."""
    if sampling_strategy == "sequential" and dataset:
        return dataset.shuffle(seed=seed).flatten_indices()
    return dataset


def build(ctx):
    from trl import KTOTrainer

    strategy = getattr(ctx.config, "train_sampling_strategy", "sequential")
    ctx.train_dataset = training_order(ctx.train_dataset, strategy, ctx.seed)
    return ctx.trl_trainer(KTOTrainer, config_class())
