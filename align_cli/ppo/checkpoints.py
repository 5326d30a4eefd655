"""PPO's checkpoints: what a checkpoint holds beyond transformers' own, and how a run resumes.

A PPO checkpoint is transformers' (policy weights or adapter, tokenizer, optimiser, scheduler,
RNG, trainer state) plus the critic in `critic/` and the KL controller and score
normalisation in `ppo_state.json`, written last so that a checkpoint without it is known to be
incomplete (`guard.checkpoint_problem`). The final save (`save_model`) holds the policy only.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

CRITIC_DIR = "critic"  # inside a checkpoint: the critic, needed to resume
PPO_STATE_NAME = "ppo_state.json"  # inside a checkpoint: the KL controller
TRAINING_ARGS_NAME = "training_args.bin"


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


class PPOCheckpoints:
    """Saving and resuming for `PPOTrainer` (a mixin over transformers' Trainer)."""

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

    def checkpoint_saved(self, folder: str) -> None:
        from ..guard import write_json_atomic

        # A checkpoint is complete only with it (guard.checkpoint_problem): never half written.
        write_json_atomic(
            os.path.join(folder, PPO_STATE_NAME),
            {"kl_controller": self.kl_ctl.state_dict(), "score_norm": self.score_norm.state_dict()},
        )

    def load_checkpoint_weights(self, folder: str, model: nn.Module | None = None) -> None:
        """The policy's and the critic's weights (before the optimiser exists)."""
        wrapper = self.accelerator.unwrap_model(model or self.model)
        load_saved_weights(wrapper.policy, folder)
        load_saved_weights(wrapper.critic, os.path.join(folder, CRITIC_DIR))

    def _resume_state(self, checkpoint: str) -> None:
        """Trainer state, callbacks, optimiser, scheduler, RNG and PPO's own state (after the optimiser exists)."""
        from transformers import TrainerState

        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self.resume_training_state(checkpoint)
        state_file = os.path.join(checkpoint, PPO_STATE_NAME)
        if os.path.exists(state_file):
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            self.kl_ctl.load_state_dict(state["kl_controller"])
            if "score_norm" in state:
                self.score_norm.load_state_dict(state["score_norm"])
