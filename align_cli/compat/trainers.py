"""TRL's and transformers' trainers: the hooks align subclasses and the state it reads (see `align_cli.compat`)."""

from __future__ import annotations

import functools
import json
import os

# --- TRL --------------------------------------------------------------------------------------


def trl_logged_metrics(trainer, mode: str) -> dict[str, list[float]]:
    """The values a TRL trainer will average and log at its next `log()`, by key.

    trl 1.16.0: DPOTrainer, GRPOTrainer and RewardTrainer collect them in `self._metrics[mode]`
    (mode "train" or "eval"; a defaultdict of lists) and `log()` writes their means. No public
    hook adds a value or reweighs one, which the reward trainers (their own losses) and DPO
    (evaluation means over rows, not batches) need.
    """
    return trainer._metrics[mode]


@functools.cache
def grpo_trainer_base() -> type:
    """TRL's GRPOTrainer with one public hook for the advantages: `advantages_from(rewards_per_func)`.

    trl 1.16.0 computes the advantages inside `_generate_and_score_completions` (z-scores of the
    weighted reward sum per group) and offers no hook to change them. This subclass lets TRL run
    (so its reward metrics and logs stay about the raw rewards), keeps the per-function rewards
    `_calculate_rewards` gathered from every process, and when the subclass's
    `advantages_from(rewards_per_func)` returns a tensor (N_all,) over all processes' rows, puts
    this process's part of it in place of TRL's and in the completions table (`_logs`).
    `advantages_from` returning None keeps TRL's.
    """
    from trl import GRPOTrainer

    class GRPOTrainerHooks(GRPOTrainer):
        def advantages_from(self, rewards_per_func):
            """(N_all,) advantages from the gathered (N_all, F) rewards, or None to keep TRL's."""
            return None

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            # (N_all, F): gathered from every process, groups of K consecutive rows.
            self.gathered_rewards_per_func = rewards_per_func
            return rewards_per_func

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            advantages = self.advantages_from(self.gathered_rewards_per_func)  # (N_all,) or None
            if advantages is None:
                return output
            local = output["advantages"].shape[0]
            start = self.accelerator.process_index * local
            output["advantages"] = advantages[start : start + local].to(output["advantages"])
            # TRL appended its own advantages of all processes to the table's deque last.
            logged = self._logs["advantages"]
            for _ in range(min(len(advantages), len(logged))):
                logged.pop()
            logged.extend(advantages.tolist())
            return output

    return GRPOTrainerHooks


@functools.cache
def reward_trainer_base() -> type:
    """TRL's RewardTrainer with its private hooks under public names, for the reward trainers.

    trl 1.16.0's RewardTrainer knows one layout (chosen/rejected). The pointwise and listwise
    trainers (methods/rm_trainer.py) keep everything else it does and override or call:

    - `prepare_dataset(dataset, processing_class, args, dataset_name)`: where TRL tokenizes
      (its `_prepare_dataset`, called from `__init__`); the default is TRL's.
    - `signature_columns`: the columns `remove_unused_columns` keeps (TRL's
      `_set_signature_columns_if_needed` keeps chosen_ids/rejected_ids/margin); None: TRL's.
    - `count_train_tokens(n)`: adds a batch's tokens to the `num_tokens` TRL logs (its
      `_total_train_tokens`, divided by the tensor-parallel size `_tp_size` as TRL does).
    - `logged_metrics(mode)`: `trl_logged_metrics`.
    - `prepare_inputs(inputs)`: transformers' `Trainer._prepare_inputs` (the batch on the
      device), which an overridden `prediction_step` must call; transformers 5.24 has no public one.
    """
    from trl import RewardTrainer

    class RewardTrainerHooks(RewardTrainer):
        signature_columns: list[str] | None = None

        def prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return self.prepare_dataset(dataset, processing_class, args, dataset_name)

        def _set_signature_columns_if_needed(self):
            if self.signature_columns is None:
                super()._set_signature_columns_if_needed()
            elif self._signature_columns is None:
                self._signature_columns = list(self.signature_columns)

        def count_train_tokens(self, tokens: int) -> int:
            self._total_train_tokens += tokens // self._tp_size
            return self._total_train_tokens

        def logged_metrics(self, mode: str) -> dict[str, list[float]]:
            return trl_logged_metrics(self, mode)

        def prepare_inputs(self, inputs):
            return self._prepare_inputs(inputs)

    return RewardTrainerHooks


# --- transformers -----------------------------------------------------------------------------


def observe_grad_norm(trainer, record) -> bool:
    """Calls `record(norm)` with the total gradient norm the Trainer computes before each optimizer step.

    transformers 5.24.0: the training loop calls `self._get_grad_norm(model, grad_norm=...)` right
    before `on_pre_optimizer_step`, which receives no norm. Wrapping it (an instance attribute
    shadows the method) spares the loss guard a second pass over the gradients.

    Returns:
        False when the trainer has no such method (a trainer with its own loop).
    """
    get_grad_norm = getattr(trainer, "_get_grad_norm", None)
    if get_grad_norm is None:
        return False

    def recorded_grad_norm(*args, **kwargs):
        norm = get_grad_norm(*args, **kwargs)
        record(norm)
        return norm

    trainer._get_grad_norm = recorded_grad_norm
    return True


def save_checkpoint(trainer) -> bool:
    """Saves a full checkpoint now (weights, optimizer, scheduler, RNG, trainer state) in
    `<output_dir>/checkpoint-<global step>`; False when the trainer cannot.

    transformers 5.24.0: `Trainer._save_checkpoint(model, trial)` is what the save schedule
    calls; `save_model` writes the weights only, which is no resume point.
    """
    if not hasattr(trainer, "_save_checkpoint"):
        return False
    trainer._save_checkpoint(trainer.model, trial=None)
    return True


def load_checkpoint(trainer, checkpoint: str) -> None:
    """Loads a checkpoint's weights into the trainer's model, without training.

    transformers 5.24.0: `Trainer._load_from_checkpoint` is what `train(resume_from_checkpoint=)`
    runs first; the public road trains as well. It handles full models, sharded weights and peft
    adapters alike (align's PPO trainer overrides it to load its critic too).
    """
    trainer._load_from_checkpoint(checkpoint)


def install_atomic_trainer_state() -> None:
    """Makes transformers write `trainer_state.json` atomically (temp file + rename).

    transformers writes it in place, last in a checkpoint; a kill mid-write leaves a truncated
    file in an otherwise complete checkpoint. Its method is replaced once per process
    (transformers 5.24: `TrainerState.save_to_json(json_path)` writing `json.dumps(asdict(self),
    indent=2, sort_keys=True) + "\n"`, kept byte for byte).
    """
    import dataclasses

    from transformers import TrainerState

    if getattr(TrainerState.save_to_json, "_align_atomic", False):
        return

    def save_to_json(self, json_path: str) -> None:
        import tempfile

        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(json_path)), prefix=".trainer_state.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, json_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    save_to_json._align_atomic = True
    TrainerState.save_to_json = save_to_json


def loop_trainer_base() -> type:
    """transformers' Trainer, for a trainer that runs its own loop (our PPO), with public hooks.

    transformers 5.24: `Trainer` calls `_save_checkpoint`, `_load_from_checkpoint` and
    `_move_model_to_device` from its own code (and `_save_optimizer_and_scheduler`, which under
    FSDP here saves the optimizer without transformers' extra copy of the model); a loop of our
    own also needs its private
    loaders of callback, optimiser/scheduler and RNG state, `_get_learning_rate` and
    `_get_output_dir`. This base turns them into public names: a subclass overrides
    `checkpoint_saved(folder)`, `load_checkpoint_weights(folder, model)` and
    `place_model(model, device)`, and calls `resume_training_state(folder)`,
    `current_learning_rate()` and `save_checkpoint_now()`. All names are in `INTERNALS`.
    """
    import os

    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class LoopTrainer(Trainer):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = os.path.join(
                    self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                )
                self.checkpoint_saved(folder)

        def checkpoint_saved(self, folder: str) -> None:
            """After Trainer wrote checkpoint `folder` (on the saving process)."""

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            self.load_checkpoint_weights(resume_from_checkpoint, model)

        def _save_optimizer_and_scheduler(self, output_dir):
            if not self.is_fsdp_enabled:
                super()._save_optimizer_and_scheduler(output_dir)
                return
            # Under FSDP transformers writes the model a second time here (pytorch_model_fsdp.bin,
            # the full base under LoRA too); a loop of its own saves its weights in `save_model`,
            # and resuming reads them from there. The optimizer in accelerate's layout (every
            # rank joins its gather), the scheduler as transformers writes it.
            import torch
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(
                self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
            )
            if self.args.should_save:
                # transformers' name (trainer.SCHEDULER_NAME), which `_load_optimizer_and_scheduler` reads
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def load_checkpoint_weights(self, folder: str, model=None) -> None:
            super()._load_from_checkpoint(folder, model)

        def _move_model_to_device(self, model, device):
            self.place_model(model, device)

        def place_model(self, model, device) -> None:
            super()._move_model_to_device(model, device)

        def resume_training_state(self, folder: str) -> None:
            """Callback, optimiser, scheduler and RNG state of checkpoint `folder` (after the optimiser exists)."""
            self._load_callback_state()
            self._load_optimizer_and_scheduler(folder)
            self._load_rng_state(folder)

        def current_learning_rate(self) -> float:
            return self._get_learning_rate()

        def save_checkpoint_now(self) -> None:
            """A full checkpoint at this step, as the save schedule writes it."""
            self._save_checkpoint(self.model_wrapped, trial=None)

    return LoopTrainer
