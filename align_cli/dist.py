"""How the processes of one `torchrun` launch share a run: `dist=ddp|fsdp|zero2|zero3`.

    torchrun --nproc_per_node 8 -m align_cli.cli train method=dpo dist=fsdp
    torchrun --nproc_per_node 8 -m align_cli.cli train method=ppo dist=fsdp      # our PPO loop too
    torchrun --nproc_per_node 8 -m align_cli.cli train method=sft dist=zero3    # pip install 'align-cli[deepspeed]'
    torchrun --nproc_per_node 8 -m align_cli.cli train method=ppo dist=zero3

- `ddp` (default): every rank holds the whole model; gradients are all-reduced.
- `fsdp`: FSDP2 through transformers' own `fsdp`/`fsdp_config` (accelerate's FSDP plugin with
  `fsdp_version: 2`): full shard (parameters resharded after each forward), one FSDP unit per
  decoder layer, the layer class read from the model itself (its `_no_split_modules`),
  optional FSDP activation checkpointing and CPU offload. Saves gather the FULL state dict on
  rank 0 (`FULL_STATE_DICT`): the run folder and every checkpoint hold a plain
  `model.safetensors` that `align export`, `from_pretrained` and later stages read, and the
  checkpoint's `pytorch_model_fsdp.bin` + `optimizer.bin` are what resuming reads. A sharded
  state dict (one file per rank) would need a conversion step before any of those could read
  it; at the model sizes this tool targets the gathered save is the simpler choice.
- `zero2` / `zero3`: DeepSpeed ZeRO through transformers' `deepspeed=` with the JSON files in
  `conf/deepspeed/` ("auto" values filled from method.args by transformers); ZeRO-3 saves
  gather 16-bit weights (`stage3_gather_16bit_weights_on_model_save`). Under ZeRO-3 every model
  loads partitioned (transformers' `deepspeed.zero.Init`), so DeepSpeed's process group is
  started before the first load (`MethodContext._deepspeed_ready`), and reward models load
  whole (compat.outside_zero3): reward functions call them per rank.

On a CPU, `fsdp` and `zero2`/`zero3` run over gloo with 2 or more processes (accelerate 1.15
would drop the FSDP plugin there: see compat.fsdp_on_cpu; DeepSpeed runs on its CPU
accelerator). Keys checked against transformers 5.24 (`TrainingArguments._process_fsdp_args`),
accelerate 1.15 and DeepSpeed 0.19.8.

The trainer settings go into every TrainingArguments-based method config (SFT, RM, DPO, KTO,
GRPO, PPO). Our PPO loop takes all four:

- under `fsdp` it shards its networks itself (align_cli/ppo/sharding.py) rather than through
  accelerate's `prepare`, which makes one module the single FSDP root, while PPO reads its
  networks through several doors (`generate`, the policy's forward, the critic's backbone and
  value head apart). The policy, the critic's backbone, its value head and the reference are
  each an FSDP2 root with one unit per decoder layer. The reference is sharded, not replicated:
  it is as large as the policy and frozen (no optimiser state), so a full copy per rank would
  cost more memory than the sharded policy itself. Reward models are replicated (a full copy
  per rank): reward functions call them per rank, on text, as often as they like, which a
  sharded module (whose every call is a collective) cannot allow. Each rollout gathers the
  policy's full weights once for `generate` (`synced_gpus=True`, so a rank whose responses all
  stopped keeps stepping with the others) and evaluation runs every rank through the same
  batches. `peft=lora` works: the reference is then the sharded policy with its adapter off.
  Saves gather the full weights on rank 0 (`model.safetensors` or the adapter, the critic in
  `critic/`), which resuming reads as under ddp; the optimizer goes through accelerate's FSDP
  file (`optimizer.bin`), without transformers' second copy of the weights
  (`pytorch_model_fsdp.bin`, see compat.loop_trainer_base).
- under `zero2`/`zero3`, policy and critic (one module) are one DeepSpeed engine, built by
  accelerate's `prepare` with our optimiser; every backward goes through the engine, told
  where each mini-batch ends (ppo/update.py), and the engine clips and steps. Under ZeRO-3
  policy and critic load partitioned; each rollout gathers the policy once for `generate`
  (`deepspeed.zero.GatheredParameters`, with `synced_gpus` as under fsdp), evaluation runs in
  lockstep, saves gather the full weights, and the critic's new head is zeroed through a
  gather. The reference loads whole on each rank (frozen: it has no optimiser state to
  partition; with LoRA it is the policy with its adapter off), as do the reward models.
  Checkpoints hold the engine's own (one optimiser partition per rank), which resuming reads.

The FSDP/DeepSpeed keys of method.args (`fsdp`, `fsdp_config`, `deepspeed`) are refused:
`dist=` is the one way to set them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import CONF_DIR, DistConfig, ModelConfig
from .errors import AlignError

# The TrainingArguments keys dist= owns; set in method.args they would bypass its checks.
OWNED_ARGS = ("fsdp", "fsdp_config", "deepspeed")
DEEPSPEED_HINT = "pip install 'align-cli[deepspeed]'"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one rank of a torchrun (or SLURM via submitit) launch."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _on_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def config_problem(
    dist: DistConfig, method_name: str, args: dict[str, Any], quant_bits: int | None
) -> str | None:
    """What makes this dist choice impossible whatever the launch, or None (train and validate)."""
    owned = [k for k in OWNED_ARGS if k in args]
    if owned:
        return (
            f"method.args.{owned[0]} is set by dist=: use dist=fsdp or dist=zero2|zero3 "
            f"(dist.activation_checkpointing, dist.cpu_offload, dist.config) instead of method.args.{owned[0]}"
        )
    if dist.name == "ddp":
        return None
    if quant_bits:
        return f"quant={quant_bits}bit with dist={dist.name} is not supported: use dist=ddp for QLoRA runs"
    if dist.name.startswith("zero") and not deepspeed_installed():
        return f"dist={dist.name} needs DeepSpeed, which is not installed: {DEEPSPEED_HINT}"
    checkpointing = [k for k in ("activation_checkpointing", "gradient_checkpointing") if args.get(k)]
    if dist.name == "fsdp" and checkpointing:
        # transformers refuses both at once, deep in Trainer.__init__; FSDP's own is the one to use.
        return (
            f"method.args.{checkpointing[0]}=true with dist=fsdp: use dist.activation_checkpointing=true "
            "(FSDP's own activation checkpointing) instead"
        )
    if dist.name == "fsdp" and dist.config:
        return "dist.config names a DeepSpeed JSON file: it applies to dist=zero2|zero3, not dist=fsdp"
    if dist.name.startswith("zero") and dist.cpu_offload:
        return f"dist.cpu_offload is FSDP's: with dist={dist.name}, set offload_optimizer in your dist.config JSON"
    if dist.name.startswith("zero"):
        deepspeed_config(dist)  # a missing or unreadable file fails now
    return None


def launch_problem(dist: DistConfig) -> str | None:
    """What makes this dist choice impossible in this process's launch, or None (train only)."""
    if dist.name == "ddp":
        return None
    command = f"torchrun --nproc_per_node N -m align_cli.cli train ... dist={dist.name}"
    if not launched():
        return f"dist={dist.name} needs a distributed launch: {command} (N=1 on one GPU)"
    if _on_accelerator():
        return None
    if dist.cpu_offload:
        return "dist.cpu_offload moves parameters off the GPU between uses: there is no GPU here; drop it"
    if world_size() < 2:
        return (
            f"dist={dist.name} on a CPU needs 2 or more processes (one CPU process has nothing to shard over): "
            f"{command}"
        )
    return None


def deepspeed_config(dist: DistConfig) -> str:
    """The DeepSpeed JSON file of dist=zero2|zero3: dist.config, or the one shipped in conf/deepspeed/.

    Raises:
        AlignError: the file is missing, is not JSON, or its ZeRO stage is not the option's.
    """
    path = (
        Path(os.path.expanduser(dist.config)) if dist.config else CONF_DIR / "deepspeed" / f"{dist.name}.json"
    )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError:
        raise AlignError(f"dist.config={path}: no such file (a DeepSpeed JSON config)") from None
    except ValueError as err:
        raise AlignError(f"dist.config={path}: not valid JSON ({err})") from None
    stage = (config.get("zero_optimization") or {}).get("stage") if isinstance(config, dict) else None
    want = int(dist.name[-1])
    if stage != want:
        raise AlignError(
            f"dist.config={path}: zero_optimization.stage is {stage!r}, dist={dist.name} wants {want}"
        )
    return str(path)


def decoder_layer_classes(model_cfg: ModelConfig) -> list[str]:
    """The class names FSDP wraps one unit each: the model's `_no_split_modules` (its decoder layer).

    Read from the model built on the meta device from its config (no weights are read).

    Raises:
        AlignError: the model's config cannot be read, or the model names no such class.
    """
    from .compat import no_split_modules
    from .model_checks import meta_model
    from .modeling import adapter_base, resolve_model_path

    path = resolve_model_path(model_cfg)
    try:
        model = meta_model(model_cfg, path)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AlignError(
            f"dist=fsdp: cannot read the model config of {adapter_base(path) or path} to find its decoder "
            f"layer ({first})"
        ) from None
    names = no_split_modules(model)
    if not names:
        raise AlignError(
            f"dist=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules is empty), "
            "so FSDP cannot wrap it layer by layer; use dist=ddp or dist=zero3"
        )
    return names


def training_args(dist: DistConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """The TrainingArguments settings of a dist choice (empty for ddp)."""
    if dist.name == "ddp":
        return {}
    checkpointing = dist.activation_checkpointing
    if checkpointing is None:  # as the methods' own default (methods/base.py): where it helps, on a GPU
        checkpointing = _on_accelerator()
    if dist.name == "fsdp":
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": True,  # full shard (FSDP1's FULL_SHARD)
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": decoder_layer_classes(model_cfg),
                "state_dict_type": "FULL_STATE_DICT",
                "activation_checkpointing": checkpointing,
                "cpu_offload": dist.cpu_offload,
            },
            # FSDP's own checkpointing replaces transformers' (which both at once refuse).
            "activation_checkpointing": False,
        }
    return {"deepspeed": deepspeed_config(dist), "activation_checkpointing": checkpointing}


def prepare(dist: DistConfig) -> None:
    """What this process needs before a trainer is built: FSDP on a CPU launch (see compat)."""
    if dist.name == "fsdp" and not _on_accelerator() and world_size() > 1:
        from .compat import fsdp_on_cpu

        fsdp_on_cpu()


def rank_with_group() -> bool:
    """Whether this process is a rank of a launch with a process group set up."""
    import sys

    torch_dist = sys.modules.get("torch.distributed")
    return launched() and torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized()


def end_rank(code: int | str | None = 0) -> None:
    """End this rank of a distributed launch without Python's interpreter teardown; other
    processes return at once.

    A process group's gloo worker threads free each finished collective's tensors a moment
    after the caller's wait returns, and freeing a tensor Python once held takes the GIL. When
    that moment falls after the main thread has begun tearing the interpreter down (a loaded
    CPU delays the worker), Python ends the worker thread inside C++ code that may not unwind,
    and the whole rank aborts ("terminate called without an active exception", exit -6) after
    a run that finished, so torchrun reports the launch as failed. torch does not destroy
    process groups at exit (pytorch/pytorch#190489), and destroying them would not stop the
    threads while the trained model still holds the group. So a rank does what the teardown's
    first steps do (waits for its non-daemon threads, runs the atexit handlers, flushes its
    streams) and then leaves with `os._exit`, which skips the rest.

    `align` calls this itself when it runs as a rank; a Python script that trains under torchrun
    calls it last: `align_cli.dist.end_rank()`.
    """
    import atexit
    import sys
    import threading

    if not rank_with_group():
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): Python prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging.shutdown, tensorboard writers, temp folders, ...
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
