"""Direct Preference Optimization (seed section 3.1) with TRL's DPOTrainer.

    align train method=dpo [method.args.beta=0.1] [peft=lora]

Data (`preference`): the seed's `instruction`/`input`/`chosen`/`rejected`, or TRL's
`prompt`/`chosen`/`rejected` (plain or conversational).

Loss: −log σ(β·log π(y+|x)/π_ref(y+|x) − β·log π(y−|x)/π_ref(y−|x)). The reference model is
a frozen copy of the starting model; with `peft=lora` it is the same model with its adapters
disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodSettings


@dataclass
class Settings(MethodSettings):
    """`method=dpo`: no settings of its own beyond `method.args` (DPOConfig's, beta among them)."""

    name: str = "dpo"
    dataset_type: str | None = "preference"
    sample: str | None = "dpo.jsonl"


SUMMARY_KEYS = ["rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"]


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import DPOConfig

    return DPOConfig


def trainer_class():
    """TRL's DPOTrainer, with evaluation metrics that are means over the eval rows.

    TRL logs the mean of per-batch means, which weighs a short last batch like a full one (10
    rows in batches of 8: the last 2 rows count as much as the first 8). Here each batch's
    means are weighted by its rows (over all processes). Training logs are untouched.
    """
    import torch
    from trl import DPOTrainer

    from ..compat import trl_logged_metrics

    class RowMeanDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self.model.training:
                rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
                counted = self.accelerator.gather(torch.tensor([rows], device=self.accelerator.device))
                self.__dict__.setdefault("_eval_rows", []).append(int(counted.sum()))
            return out

        def log(self, logs, start_time=None):
            sizes = self.__dict__.pop("_eval_rows", [])
            if not self.model.training and sizes:
                logged = trl_logged_metrics(self, "eval")
                for key, values in logged.items():
                    if len(values) == len(sizes):
                        logged[key] = [sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)]
            super().log(logs, start_time)

    return RowMeanDPOTrainer


def check(ctx, rows: list[dict] | None) -> list[str]:
    """Settings TRL accepts but that train nonsense; `align data validate` runs this too."""
    from .base import beta_problems

    return beta_problems(ctx.config)


def build(ctx):
    return ctx.trl_trainer(trainer_class(), config_class())
