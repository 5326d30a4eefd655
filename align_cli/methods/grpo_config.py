"""`method=grpo`'s config: trl.GRPOConfig plus the ptx loss's keys (align_cli/ppo/ptx.py).

A module of its own (imported when a GRPO run is configured) so that TRL loads only then, and so
that the class pickled into a run's training_args.bin is found again by its module and name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's GRPOConfig, and the weight and batch of the ptx loss on `data.ptx_path`."""

    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the language-model loss on data.ptx_path's demonstrations added to every "
            "optimiser step (InstructGPT's pretraining mix); 0: off."
        },
    )
    ptx_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "ptx rows per optimiser step, shared among its gradient_accumulation_steps micro-batches "
            "(as PPO's ptx_batch_size); null: per_device_train_batch_size per micro-batch."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ptx_coef < 0:
            raise ValueError(f"ptx_coef={self.ptx_coef} must not be negative (0 turns the ptx loss off)")
        if self.ptx_batch_size is not None and self.ptx_batch_size < 1:
            raise ValueError(f"ptx_batch_size={self.ptx_batch_size} must be at least 1, or null")
