"""What every method builder receives: `MethodContext`.

`train.py` fills it (config already typed, data already converted) and a method's
`build(ctx)` turns it into a trainer. Methods never read config groups or files themselves.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .. import modeling
from ..config import DataConfig, DistConfig, MethodSettings, ModelConfig, PeftConfig, QuantConfig
from ..diagnostics import CollapseSettings
from ..errors import AlignError, nearest

log = logging.getLogger("align")

# Our defaults for every TrainingArguments-derived config; a method's own defaults and then
# the user's `method.args` override them.
RUN_DEFAULTS: dict[str, Any] = {
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "disable_tqdm": False,
}


def _precision_defaults(model_cfg: ModelConfig, valid: set[str]) -> dict[str, Any]:
    """bf16 mixed precision and activation checkpointing where they help: on a GPU.

    TRL turns both on by default, which fails (bf16) or only slows things down (checkpointing)
    on a CPU.
    """
    import torch

    gpu = torch.cuda.is_available()
    out: dict[str, Any] = {}
    if "bf16" in valid:
        out["bf16"] = bool(gpu and torch.cuda.is_bf16_supported() and model_cfg.dtype != "float32")
    # TRL defaults the deprecated `gradient_checkpointing` to True; setting its successor keeps
    # transformers from warning about the old name on every run.
    if "activation_checkpointing" in valid:
        out["activation_checkpointing"] = gpu
    elif "gradient_checkpointing" in valid and not gpu:
        out["gradient_checkpointing"] = False
    accelerator = (
        gpu or torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )
    if "use_cpu" in valid and not accelerator:
        # Without it, accelerate ignores torchrun's environment on a CPU-only machine and each
        # process trains alone; with it, `torchrun --nproc_per_node N` is real DDP over gloo.
        out["use_cpu"] = True
    return out


@dataclass
class RolloutSettings(MethodSettings):
    """The keys of the methods that sample completions and score them with a reward (ppo, grpo)."""

    default_reward: str = "length"  # the reward option used when the command line names none
    # true: stop at the first collapse signature and keep the last checkpoint before it
    stop_on_collapse: bool = False
    collapse: CollapseSettings = field(default_factory=CollapseSettings)  # thresholds (diagnostics.py)


_SCALARS = (bool, int, float, str)


def _scalar_types(hint: Any) -> tuple[type, ...] | None:
    """The scalar types a config field annotation allows (None in it is skipped), or None when it
    allows anything else too (lists, dicts, enums): then the config class checks the value."""
    import types
    import typing

    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    parts = tuple(p for p in parts if p is not type(None))
    return parts if parts and all(p in _SCALARS for p in parts) else None


def check_arg_types(cls: type, args: dict[str, Any]) -> None:
    """Raises a one-line AlignError for a method.args value of the wrong type (`beta=abc`)."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot evaluate: leave the checks to the class
        return
    for key, value in args.items():
        allowed = _scalar_types(hints.get(key))
        if value is None or allowed is None:
            continue
        ok = any(
            isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in allowed
        ) or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            names = " or ".join(
                {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[t]
                for t in allowed
            )
            raise AlignError(
                f"method.args.{key}={value!r} is not valid: {cls.__name__}.{key} must be {names}"
            )


# Ranges every TrainingArguments-based config shares; transformers only finds most of them once
# training has started (or never: num_train_epochs=-1 "trains" zero steps).
_POSITIVE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
_NON_NEGATIVE = ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm")


def beta_problems(config: Any) -> list[str]:
    """DPO's and KTO's beta must be positive: it scales the implicit reward, so a negative beta
    learns the preferences backwards and 0 not at all (TRL accepts both)."""
    beta = getattr(config, "beta", None)
    if beta is not None and beta <= 0:
        return [
            f"method.args.beta={beta} must be positive (the strength of the pull toward the reference model; e.g. 0.1)"
        ]
    return []


def check_arg_ranges(config: Any) -> None:
    """Raises a one-line AlignError for a shared training setting out of range."""
    problems = []
    for key in _POSITIVE:
        value = getattr(config, key, None)
        if value is not None and value < 1:
            problems.append(f"method.args.{key}={value} must be at least 1")
    for key in _NON_NEGATIVE:
        value = getattr(config, key, None)
        if value is not None and value < 0:
            problems.append(f"method.args.{key}={value} must not be negative")
    max_steps = getattr(config, "max_steps", -1)
    epochs = getattr(config, "num_train_epochs", 1)
    if (max_steps is None or max_steps <= 0) and epochs is not None and epochs <= 0:
        problems.append(
            f"method.args.num_train_epochs={epochs} trains nothing: make it positive, or set method.args.max_steps"
        )
    if problems:
        raise AlignError("; ".join(problems))


@dataclass
class MethodContext:
    """Everything a method needs, as plain values and loaded objects."""

    # The method's checked settings (config.method_settings: its `Settings`, every key present, as a
    # dict without `args`).
    method: dict[str, Any]
    args: dict[str, Any]
    model_cfg: ModelConfig
    quant_cfg: QuantConfig
    peft_cfg: PeftConfig
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any = None
    reward: dict[str, Any] | None = None
    output_dir: str = "outputs/run"
    callbacks: list = field(default_factory=list)
    seed: int = 42
    config: Any = None  # the method's config built from method.args once up front, for `check`
    dist: DistConfig = field(default_factory=DistConfig)  # dist=: DDP, FSDP or DeepSpeed (align_cli/dist.py)
    data_cfg: DataConfig | None = None  # the `data` group (for a method's extra data: PPO's data.ptx_path)
    ptx_read: Any = None  # (conversational, data.Loaded): data.ptx_path as the check read it, for the build

    def trl_config(self, cls: type, **defaults: Any):
        """Builds a TRL/transformers config dataclass: our run defaults < `defaults` < method.args.

        Raises:
            AlignError: an unknown key in method.args (named, with the nearest valid keys), or a
                value the config class rejects.
        """
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        # A config may name its renamings of TRL's keys (module-level TRL_NAMES: TRL's -> ours).
        renamed = getattr(importlib.import_module(cls.__module__), "TRL_NAMES", {})
        for key in self.args:
            if key not in valid:
                hint = (
                    f" (did you mean: {renamed[key]}? TRL's {key} is called so here)"
                    if key in renamed
                    else ""
                )
                raise AlignError(
                    f"method.args.{key} is not a {cls.__name__} option{hint or nearest(key, valid)}; "
                    f"see the {cls.__name__} documentation for the valid keys"
                )
        values: dict[str, Any] = {k: v for k, v in RUN_DEFAULTS.items() if k in valid}
        values.update(_precision_defaults(self.model_cfg, valid))
        values.update(output_dir=self.output_dir, seed=self.seed)
        if "max_length" in valid:
            values["max_length"] = self.model_cfg.max_length
        if self.eval_dataset is not None and "eval_strategy" in valid:
            values.update(eval_strategy="steps", eval_steps=0.25)
        values.update(defaults)
        values.update(self._dist_args(valid))
        values.update(self.args)
        if "gradient_checkpointing" in self.args and "activation_checkpointing" not in self.args:
            values.pop("activation_checkpointing", None)  # the user's old name decides
        check_arg_types(cls, self.args)
        try:
            config = cls(**values)
        except (TypeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AlignError(f"method.args: {cls.__name__} rejected the settings: {first}") from None
        check_arg_ranges(config)
        return config

    def _dist_args(self, valid: set[str]) -> dict[str, Any]:
        """dist='s TrainingArguments settings (align_cli/dist.py), for the keys `valid` has."""
        from .. import dist

        out = dist.training_args(self.dist, self.model_cfg)
        if "activation_checkpointing" in out and "activation_checkpointing" not in valid:
            out["gradient_checkpointing"] = out.pop("activation_checkpointing")
        return {k: v for k, v in out.items() if k in valid}

    def load_model(
        self,
        kind: str = "causal_lm",
        path: str | None = None,
        quantize: bool = True,
        quant_cfg: QuantConfig | None = None,
    ):
        """Loads the configured model (or `path`) with the run's quantization, or with `quant_cfg`
        (a frozen role's, e.g. PPO's 4-bit reference: it trains nothing, so it needs no LoRA).

        An adapter-only folder (a `peft=lora` run) merges into its base in memory when it is
        loaded the way it was trained. It is written merged to disk first when it is loaded
        quantized or as another head type (the PPO critic from an SFT adapter), and when it is
        the starting model of a new LoRA run: `<run>/base_model` is then kept, and the new
        adapter names it as its base, so loading the result with peft gives the weights that
        were trained on, not the raw base.
        """
        if quant_cfg is None and self.quant_cfg.bits and self.peft_cfg.method == "none" and quantize:
            raise AlignError(
                f"quant={self.quant_cfg.bits}bit needs peft=lora: quantized weights cannot be trained directly"
            )
        if quant_cfg is None:
            quant_cfg = self.quant_cfg if quantize else None
        quantized = bool(quant_cfg is not None and quant_cfg.bits)
        resolved = modeling.resolve_model_path(self.model_cfg, path)
        task = modeling.adapter_task(resolved)
        is_start = path is None or path == self.model_cfg.name_or_path
        lora_run = self.peft_cfg.method != "none"
        merge = task is not None and (
            (is_start and lora_run)
            or {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[kind] != task
            or quantized
        )
        scratch = None
        if merge and is_start and lora_run:
            target = os.path.abspath(os.path.join(self.output_dir, "base_model"))
        elif merge:
            os.makedirs(self.output_dir, exist_ok=True)
            scratch = tempfile.mkdtemp(dir=self.output_dir, prefix=".merged-")
            target = os.path.join(scratch, "model")
        if self.dist.name == "zero3":
            self._deepspeed_ready()
        if merge:
            if not os.path.exists(os.path.join(target, "config.json")):
                log.info("merging the LoRA adapter in %s into its base model", resolved)
            path = modeling.merge_adapter_folder(self.model_cfg, resolved, target)
        try:
            return modeling.load_model(
                self.model_cfg,
                quant_cfg,
                kind=kind,
                path=path,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _deepspeed_ready(self) -> None:
        """Sets up DeepSpeed's process group before a model loads under ZeRO-3.

        transformers 5.24 builds the model inside `deepspeed.zero.Init` (each rank keeps only its
        partition) when a ZeRO-3 TrainingArguments exists, and that context needs DeepSpeed's
        communication initialised; TrainingArguments only does so when its devices are first
        read (`_setup_devices`), which the trainers do after the model is loaded.
        """
        if self.config is not None and getattr(self.config, "deepspeed", None):
            import deepspeed
            import torch.distributed

            self.config.device  # noqa: B018 - the property starts the process group
            if not deepspeed.comm.is_initialized():
                deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())

    def trl_trainer(self, trainer_cls: type, config_cls: type, **kwargs: Any):
        """A TRL trainer built the usual way: our model, config, data, tokenizer, LoRA, callbacks.

        SFT, DPO and KTO need nothing else; `kwargs` go to the trainer as they are.
        """
        return trainer_cls(
            model=self.load_model(),
            args=self.trl_config(config_cls),
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=self.tokenizer,
            peft_config=self.lora(),
            callbacks=self.callbacks,
            **kwargs,
        )

    def lora(self, task_type: str = "CAUSAL_LM"):
        """The LoRA config for `peft=lora`, or None."""
        return modeling.lora_config(self.peft_cfg, task_type)
