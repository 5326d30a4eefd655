"""What every method builder receives: `MethodContext`.

`train.py` fills it (config already typed, data already converted) and a method's
`build(ctx)` turns it into a trainer. Methods never read config groups or files themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .. import modeling
from ..config import ModelConfig, PeftSettings, QuantConfig
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
    if "gradient_checkpointing" in valid and not gpu:
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
class MethodContext:
    """Everything a method needs, as plain values and loaded objects."""

    method: dict[str, Any]
    args: dict[str, Any]
    model_cfg: ModelConfig
    quant_cfg: QuantConfig
    peft_cfg: PeftSettings
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any = None
    reward: dict[str, Any] | None = None
    output_dir: str = "outputs/run"
    callbacks: list = field(default_factory=list)
    seed: int = 42

    def trl_config(self, cls: type, **defaults: Any):
        """Builds a TRL/transformers config dataclass: our run defaults < `defaults` < method.args.

        Raises:
            AlignError: an unknown key in method.args (named, with the nearest valid keys), or a
                value the config class rejects.
        """
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in self.args:
            if key not in valid:
                raise AlignError(
                    f"method.args.{key} is not a {cls.__name__} option{nearest(key, valid)}; "
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
        values.update(self.args)
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AlignError(f"method.args: {cls.__name__} rejected the settings: {first}") from None

    def load_model(self, kind: str = "causal_lm", path: str | None = None, quantize: bool = True):
        """Loads the configured model (or `path`) with the run's quantization.

        An adapter-only folder (a `peft=lora` run) merges into its base in memory when it is
        loaded the way it was trained. It is written merged to disk first when it is loaded
        quantized or as another head type (the PPO critic from an SFT adapter), and when it is
        the starting model of a new LoRA run: `<run>/base_model` is then kept, and the new
        adapter names it as its base, so loading the result with peft gives the weights that
        were trained on, not the raw base.
        """
        if self.quant_cfg.bits and self.peft_cfg.method == "none" and quantize:
            raise AlignError(
                f"quant={self.quant_cfg.bits}bit needs peft=lora: quantized weights cannot be trained directly"
            )
        resolved = modeling.resolve_model_path(self.model_cfg, path)
        task = modeling.adapter_task(resolved)
        is_start = path is None or path == self.model_cfg.name_or_path
        lora_run = self.peft_cfg.method != "none"
        merge = task is not None and (
            (is_start and lora_run)
            or {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[kind] != task
            or bool(quantize and self.quant_cfg.bits)
        )
        scratch = None
        if merge and is_start and lora_run:
            target = os.path.abspath(os.path.join(self.output_dir, "base_model"))
        elif merge:
            os.makedirs(self.output_dir, exist_ok=True)
            scratch = tempfile.mkdtemp(dir=self.output_dir, prefix=".merged-")
            target = os.path.join(scratch, "model")
        if merge:
            if not os.path.exists(os.path.join(target, "config.json")):
                log.info("merging the LoRA adapter in %s into its base model", resolved)
            path = modeling.merge_adapter_folder(self.model_cfg, resolved, target)
        try:
            return modeling.load_model(
                self.model_cfg,
                self.quant_cfg if quantize else None,
                kind=kind,
                path=path,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

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
