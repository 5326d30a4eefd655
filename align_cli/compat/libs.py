"""bitsandbytes' 4-bit layers on the CPU, accelerate's FSDP on a CPU launch, and import-time noise (see `align_cli.compat`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def outside_zero3() -> Iterator[None]:
    """Models loaded inside this context are whole, even while a ZeRO-3 run is configured.

    transformers 5.24 loads every model inside `deepspeed.zero.Init` (each rank keeping only a
    partition of each weight) while a ZeRO-3 TrainingArguments is alive: it keeps a weak
    reference to that config in `transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`,
    read by `is_deepspeed_zero3_enabled`. A partitioned module runs only inside a DeepSpeed
    engine, with every rank calling it together. Reward models are called per rank, on text, as
    often as a reward function likes, so they load whole; `unset_hf_deepspeed_config` and
    `set_hf_deepspeed_config` are transformers' own switches, the reference is how to restore.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # no accelerate/deepspeed integration: nothing is ever partitioned
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None or not config.is_zero3():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def no_split_modules(model) -> list[str]:
    """The class names of a transformers model's blocks that must not be split (its decoder layers).

    transformers 5.24: `PreTrainedModel._no_split_modules`, a class attribute every architecture
    sets; it is what accelerate's device maps and transformers' own FSDP auto-wrap read, and no
    public accessor exists. `dist=fsdp` wraps one FSDP unit per such layer.
    """
    return sorted(set(getattr(model, "_no_split_modules", None) or []))
