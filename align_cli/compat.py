"""Every place align touches a library's internals, with the version each touch was written against.

The rule: code outside this module uses only the public API of TRL, transformers, Hydra, OmegaConf,
bitsandbytes, accelerate and peft. When align needs a private method, a private attribute, a
monkeypatch or the text of a library's message, it goes here, as a small named function or a
documented subclass hook, with a comment saying which version it was written against and why no
public API does the job. `INTERNALS` lists every private name relied on (including those
align_cli/ppo/ still touches directly); tests/test_compat.py checks that each one still exists
with the parameters listed, so a library upgrade fails one clear test instead of a training run.

On an upgrade of a pinned library (pyproject.toml): run tests/test_compat.py, then read the
library's changes for each name it lists.

Nothing here imports torch, transformers, TRL, Hydra or bitsandbytes at module level, so
`align --help` stays instant; the subclasses are built on first use (`functools.cache`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import NamedTuple


class Internal(NamedTuple):
    """One private name of a library that align relies on.

    Attributes:
        owner: where it lives: `module:Class` for a method or attribute of a class, `module` for a
            module-level function.
        name: the attribute's name.
        params: for a callable, its parameter names in order (without `self`), as
            `inspect.signature` gives them; None for an attribute that the owner's source assigns
            (`self.<name> = ...` in the class or one of its bases, or `<obj>.<name> = ...` in the module).
        why: what align does with it (and where, when that is not this module).
    """

    owner: str
    name: str
    params: tuple[str, ...] | None
    why: str


_GRPO, _REWARD, _TRAINER = "trl:GRPOTrainer", "trl:RewardTrainer", "transformers:Trainer"
_PPO = "PPO's own loop (`loop_trainer_base`)"

# Written against trl 1.16.0, transformers 5.24.0, hydra-core 1.3.8 and bitsandbytes 0.50.2.
INTERNALS: tuple[Internal, ...] = (
    # TRL: GRPO's advantages (`grpo_trainer_base`).
    Internal(
        _GRPO,
        "_calculate_rewards",
        ("inputs", "prompts", "completions", "completion_ids_list"),
        "keeps them (rank)",
    ),
    Internal(_GRPO, "_generate_and_score_completions", ("inputs",), "its advantages are replaced (rank)"),
    Internal(_GRPO, "_logs", None, "the completions table shows the advantages used"),
    # TRL: what the trainers log (`trl_logged_metrics`).
    Internal("trl:DPOTrainer", "_metrics", None, "evaluation means over rows, not over batches"),
    Internal(_REWARD, "_metrics", None, "pointwise/listwise training metrics; exact evaluation metrics"),
    # TRL: the reward trainer's data layout (`reward_trainer_base`).
    Internal(
        _REWARD, "_prepare_dataset", ("dataset", "processing_class", "args", "dataset_name"), "our layouts"
    ),
    Internal(_REWARD, "_set_signature_columns_if_needed", (), "keeps the pointwise/listwise token columns"),
    Internal(_REWARD, "_signature_columns", None, "the columns remove_unused_columns keeps"),
    Internal(_REWARD, "_total_train_tokens", None, "num_tokens for the pointwise/listwise losses"),
    Internal(_REWARD, "_tp_size", None, "num_tokens counts a token once under tensor parallelism"),
    # transformers' Trainer (`reward_trainer_base`, `observe_grad_norm`, `save_checkpoint`, `load_checkpoint`).
    Internal(_TRAINER, "_prepare_inputs", ("inputs",), "the reward trainers' prediction_step"),
    Internal(_TRAINER, "_get_grad_norm", ("model", "grad_norm"), "the loss guard reads the Trainer's norm"),
    Internal(
        _TRAINER, "_save_checkpoint", ("model", "trial"), "a resume point off schedule; ppo/ overrides it"
    ),
    Internal(
        _TRAINER, "_load_from_checkpoint", ("resume_from_checkpoint", "model"), "weights, no training; PPO's"
    ),
    Internal("transformers:TrainerState", "save_to_json", ("json_path",), "replaced by an atomic write"),
    Internal(_TRAINER, "_load_rng_state", ("checkpoint",), _PPO),
    Internal(_TRAINER, "_load_optimizer_and_scheduler", ("checkpoint",), _PPO),
    Internal(_TRAINER, "_load_callback_state", (), _PPO),
    Internal(_TRAINER, "_get_learning_rate", (), _PPO),
    Internal(_TRAINER, "_get_output_dir", ("trial",), _PPO),
    Internal(_TRAINER, "_move_model_to_device", ("model", "device"), _PPO),
    # Hydra (`hydra_args_parser`).
    Internal("hydra._internal.utils", "get_args_parser", (), "align reads Hydra's flags before Hydra starts"),
    # bitsandbytes (`keep_4bit_trainable`).
    Internal(
        "bitsandbytes.functional",
        "_convert_weight_packed_for_cpu_inverse",
        ("packed_weight", "quant_state", "block_n"),
        "unpacks a 4-bit weight repacked for the CPU inference kernel",
    ),
    Internal("bitsandbytes.nn:Linear4bit", "support_avx512bf16_for_cpu", None, "gates that repacking"),
    Internal("bitsandbytes.functional", "packing_format_for_cpu", None, "says a weight was repacked"),
)


# bitsandbytes 0.49-0.50, CPU with AVX512-BF16: importing the CPU backend tries to load an optional
# inference kernel from the `kernels` package and logs a warning when it is missing. align never
# uses that kernel (see `keep_4bit_trainable`), so the warning is noise on every command, even
# quant=none (peft imports bitsandbytes when it is installed).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_library_noise() -> None:
    """Silences what libraries print on import that says nothing to an align user.

    - bitsandbytes' warning about its optional CPU inference kernel (see BNB_CPU_OPS_LOGGER);
    - alembic 1.14 (optuna's schema tool, with the sweep extra) logs one "setup plugin" line per
      plugin at INFO, which Hydra's logging shows at the start of every Optuna sweep;
    - trl 1.16 reads `model.is_gradient_checkpointing` (trl/models/utils.py) when DPO/KTO/GRPO
      generate or unwrap, which transformers 5.24 deprecates with a FutureWarning per run: TRL's
      to change, not the user's.
    """
    import warnings

    logging.getLogger(BNB_CPU_OPS_LOGGER).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def keep_4bit_trainable(model) -> int:
    """Stops bitsandbytes' 4-bit layers from switching to the CPU inference kernel; returns how many.

    bitsandbytes 0.49-0.50 (checked against 0.50.2): on a CPU with AVX512-BF16,
    `Linear4bit.forward` in eval mode without grad repacks its weight in place
    (`packing_format_for_cpu`) and nothing undoes it when training resumes. From then on
    `matmul_4bit` takes the inference kernel, which has no backward: layers with a bias crash
    ("a view of a leaf Variable that requires grad is being used in an in-place operation"), and
    layers without one pass no gradient to their input, silently. Every evaluation pass and every
    PPO/GRPO rollout runs in eval mode, so training must never see the packed layout. The flag
    `support_avx512bf16_for_cpu` is what gates the repacking; a layer already packed is unpacked.
    CUDA never takes that path; the flag is harmless there.

    Args:
        model: any torch module (a transformers model, a peft model).
    """
    count = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        count += 1
    return count


def check_4bit_training(device: str, quant_type: str, compute_dtype) -> str | None:
    """Runs what a QLoRA run does to one 4-bit layer: an eval forward, then a training backward.

    The layer has a bias, a LoRA pair beside it, and a trainable layer before it that gets its
    gradient only through the 4-bit layer, so both failure modes of a 4-bit kernel show: a crash,
    or a gradient that does not reach the weights before it (or is not finite).

    Returns:
        None when gradients reach every trainable tensor and are finite, else what went wrong.
    """
    import bitsandbytes as bnb
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(64, 64, bias=True, quant_type=quant_type, compute_dtype=compute_dtype)
        layer = layer.to(device)
        layer.bias.requires_grad_(False)  # frozen, as peft leaves a base layer
        keep_4bit_trainable(layer)
        before = torch.nn.Parameter(torch.randn(64, 64, device=device) * 0.1)
        lora_a = torch.nn.Parameter(torch.randn(64, 4, device=device) * 0.1)
        lora_b = torch.nn.Parameter(torch.randn(4, 64, device=device) * 0.1)
        x = torch.randn(3, 64, device=device)

    def forward():
        hidden = x @ before
        # `before` gets its gradient through the 4-bit layer alone; the LoRA pair reads x.
        return layer(hidden.to(compute_dtype)).float() + x @ lora_a @ lora_b

    try:
        layer.eval()
        with torch.no_grad():
            forward()
        layer.train()
        forward().pow(2).mean().backward()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"a training step after an evaluation pass failed ({first})"
    for name, param in (("the layer before it", before), ("LoRA A", lora_a), ("LoRA B", lora_b)):
        if param.grad is None:
            return f"no gradient reached {name} after an evaluation pass"
        if not torch.isfinite(param.grad).all():
            return f"the gradient of {name} is not finite after an evaluation pass"
    if before.grad.abs().sum() == 0:
        return "the gradient through the 4-bit layer is zero after an evaluation pass"
    return None


def fsdp_on_cpu() -> None:
    """Lets accelerate run FSDP2 on a CPU launch (torchrun + gloo); idempotent.

    accelerate 1.15 (`AcceleratorState.__init__`, checked against 1.15.0) turns an
    `fsdp_plugin` into `DistributedType.FSDP` only for accelerator devices (MULTI_GPU,
    MULTI_XPU, ...). A CPU launch is MULTI_CPU, so the plugin transformers builds from
    `fsdp_config` is dropped without a word and training stays plain DDP. torch's FSDP2
    (`fully_shard`) itself runs on CPU tensors over gloo (checked with torch 2.13: training,
    the full-state-dict gather on save, resume). This makes the state FSDP in exactly that
    case. The type is written into PartialState's shared state too: every later
    `AcceleratorState()` copies PartialState's `distributed_type` back over its own (that is
    how it would revert to MULTI_CPU, and `get_state_dict` would then hand `save_pretrained`
    unsharded DTensors that only rank 0 tries to gather: a gloo deadlock).
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "_align_fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._align_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = __init__


# --- Hydra ------------------------------------------------------------------------------------

# The flags of Hydra's parser that align reads (`preflight.prepare`, `pipeline.prepare`).
HYDRA_FLAGS = (
    "help",
    "hydra_help",
    "shell_completion",
    "info",
    "experimental_rerun",
    "multirun",
    "cfg",
    "config_name",
    "config_path",
    "config_dir",
    "overrides",
)


def hydra_args_parser():
    """Hydra's own command-line parser (an `argparse.ArgumentParser`; its flags: `HYDRA_FLAGS`).

    hydra-core 1.3.8: `hydra._internal.utils.get_args_parser`. align picks the run folder and
    checks every override before `hydra.main` starts, so it must split the command line exactly
    as Hydra will; Hydra exposes no public parser.
    """
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


# hydra-core 1.3.8 / omegaconf 2.3: the beginnings of the messages align turns into one-line
# errors (`errors.hydra_message`). These errors have no type or attribute of their own that
# says which they are (each is a ConfigCompositionException), so only the text tells.
HYDRA_AMBIGUOUS = "Ambiguous value for argument"  # key=a,b without -m
HYDRA_NO_CHOICE = "You must specify '{group}'"  # a defaults-list group left as ???, then its options
HYDRA_MERGE = "Error merging override"  # a value of the wrong type; the cause says why
OMEGACONF_NOT_IN = " not in "  # "Key 'x' not in 'ModelConfig'": a key the schema does not have
HYDRA_TOKEN_ERROR = "token recognition error"  # the override lexer (ANTLR) met a character it has no rule for


def is_ambiguous_value(message: str) -> bool:
    """Whether Hydra refused `key=a,b` (a sweep's syntax) in a single run."""
    return message.startswith(HYDRA_AMBIGUOUS)


def missing_choice(message: str, group: str) -> list[str] | None:
    """The options Hydra lists when no option of `group` was chosen; None for another message.

    hydra-core 1.3.8 writes "You must specify 'method', e.g, method=<OPTION>", then
    "Available options:", then one option per line.
    """
    if not message.startswith(HYDRA_NO_CHOICE.format(group=group)):
        return None
    return [line.strip() for line in message.splitlines()[2:] if line.strip()]


def is_unquoted_character_error(reason: str) -> bool:
    """Whether Hydra's override parser stopped at a character its unquoted values cannot hold
    (any non-ASCII letter, as in `data.system=你是助手`); quoting the value is then the fix."""
    return HYDRA_TOKEN_ERROR in reason


def is_merge_error(reason: str) -> bool:
    """Whether Hydra's message is its bare "Error merging override <o>" (the cause holds why)."""
    return reason.startswith(HYDRA_MERGE)


def is_unknown_key(cause: BaseException | None) -> bool:
    """Whether OmegaConf refused a key its (structured) config does not have."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    return isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and OMEGACONF_NOT_IN in str(cause)


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
    `_move_model_to_device` from its own code; a loop of our own also needs its private
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
