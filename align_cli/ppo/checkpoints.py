"""PPO's checkpoints: what a checkpoint holds beyond transformers' own, and how a run resumes.

A PPO checkpoint is transformers' (policy weights or adapter, tokenizer, optimiser, scheduler,
RNG, trainer state) plus the critic in `critic/` and the KL controller and score
normalisation in `ppo_state.json`, written last so that a checkpoint without it is known to be
incomplete (`guard.checkpoint_problem`). The final save (`save_model`) holds the policy only.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import torch
from torch import nn

from .sharding import full_state_dict, is_sharded, load_full_state_dict, loading_full_tensors

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

    sharded = is_sharded(module)
    if hasattr(module, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
        with loading_full_tensors(module) if sharded else nullcontext():
            set_peft_model_state_dict(module, adapter)
        return
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path) and not sharded:
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(module, folder, strict=False)
        return
    if sharded:  # full tensors from the file(s), each rank keeping its shard
        import glob

        files = (
            [path] if os.path.exists(path) else sorted(glob.glob(os.path.join(folder, "model-*.safetensors")))
        )
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        result = load_full_state_dict(module, state)
    else:
        result = module.load_state_dict(load_file(path), strict=False)
    missing = set(result.missing_keys) - _tied_names(module)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder} does not match the model: missing {sorted(missing)[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _gathered(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded module's full state dict for `save_pretrained` (rank 0; every rank must call it),
    without the second name of a tied weight, as `save_pretrained` itself writes; None when unsharded.

    With a LoRA adapter, only what trains is gathered: `save_pretrained` writes the adapter alone.
    """
    if not is_sharded(module):
        return None
    tied = _tied_names(module)
    state = full_state_dict(module, trained_only=hasattr(module, "peft_config"))
    return {k: v for k, v in state.items() if k not in tied}


class PPOCheckpoints:
    """Saving and resuming for `PPOTrainer` (a mixin over transformers' Trainer)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the policy (full model or LoRA adapter) and tokenizer; checkpoints add the critic."""
        output_dir = output_dir or self.args.output_dir
        # Sharded (dist=fsdp): every rank joins the gather of the full weights; rank 0 writes them.
        policy_state = _gathered(self.policy)
        critic_state = _gathered(self.critic) if _internal_call else None
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.policy.save_pretrained(output_dir, state_dict=policy_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if _internal_call:  # a checkpoint: resuming needs the critic too
            self.critic.save_pretrained(os.path.join(output_dir, CRITIC_DIR), state_dict=critic_state)

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
        if getattr(self, "is_deepspeed_enabled", False):
            # The engine's optimizer partitions (transformers reads only the scheduler under DeepSpeed).
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(self.model_wrapped, checkpoint)
        state_file = os.path.join(checkpoint, PPO_STATE_NAME)
        if os.path.exists(state_file):
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            self.kl_ctl.load_state_dict(state["kl_controller"])
            if "score_norm" in state:
                self.score_norm.load_state_dict(state["score_norm"])
