"""PPO's networks under `dist=fsdp`: FSDP2 (`fully_shard`) applied to each role where it is read.

accelerate's `prepare` shards one module with one root; PPO reads its networks through several
doors (`policy.generate`, `policy(...)`, the critic's backbone and head called apart, the
reference), and FSDP2 unshards a unit's parameters only when that unit's own `forward` runs. So
each door is its own FSDP root here, and every decoder layer (the model's `_no_split_modules`)
its own unit under it:

- the policy: the transformers model itself (inside a PeftModel, the model under the adapter,
  so `generate`, the reference pass with the adapter off and the ptx loss all run its forward);
- the critic: its backbone and its value head, two roots (`models.critic_values` calls them
  apart to read a value at every position);
- the reference, when it is a separate copy: sharded the same way (frozen, no optimiser state),
  since it is as large as the policy; with LoRA it is the policy with its adapter off.

Reward models are not sharded: reward functions call them per rank on text (and user code may
call them any number of times), which a sharded module cannot allow; each rank holds a copy.

Generation gathers the policy once per `generate` call (`gathered_for_generation`): every unit
is unsharded up front and kept so across the decoding steps, then resharded; all ranks must
call it together, and `generate` runs with `synced_gpus=True` so a rank whose responses all
stopped keeps stepping until every rank is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .models import backbone, unwrap_peft, value_head


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules (`fully_shard` applied) in `module`, itself included."""
    if not torch.distributed.is_available():  # a torch build without it shards nothing
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def zero3_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that DeepSpeed ZeRO-3 partitioned (dist=zero3)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def is_sharded(module: nn.Module | None) -> bool:
    """Whether `module` is split over the ranks (FSDP2 units or ZeRO-3 partitions): its every
    forward is then a collective call that all ranks make together."""
    return module is not None and bool(fsdp_units(module) or zero3_params(module))


def _layer_classes(model: nn.Module, fallback: list[str]) -> set[str]:
    from ..compat import no_split_modules

    return set(no_split_modules(model) or fallback)


def _shard(model: nn.Module, roots: list[nn.Module], layers: set[str], kwargs: dict[str, Any]) -> None:
    """One unit per decoder layer of `model`, then each of `roots` (bottom-up, as FSDP2 wants)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    for root in roots:
        fully_shard(root, **kwargs)


def shard_roles(
    accelerator: Any,
    policy: nn.Module,
    critic: nn.Module,
    ref_model: nn.Module | None,
    layer_classes: list[str],
) -> None:
    """Shards policy, critic and reference in place (their parameters become DTensors).

    Args:
        accelerator: the trainer's accelerator (its FSDP plugin: resharding, mixed precision, offload).
        policy / critic / ref_model: as `prepare_roles` returned them (the reference may be None).
        layer_classes: decoder layer class names to wrap when a model names none itself.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    trained = [policy, critic]
    if accelerator.mixed_precision != "no":
        # FSDP2 keeps fp32 master weights of what trains (as accelerate's own prepare does);
        # mp_policy casts them for compute.
        for model in trained:
            for param in model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.to(torch.float32)
    base = unwrap_peft(policy)
    _shard(base, [base], _layer_classes(base, layer_classes), kwargs)
    critic_base = unwrap_peft(critic)
    _shard(
        critic_base,
        [backbone(critic_base), value_head(critic_base)],
        _layer_classes(critic_base, layer_classes),
        kwargs,
    )
    if ref_model is not None:
        _shard(ref_model, [ref_model], _layer_classes(ref_model, layer_classes), kwargs)


@contextmanager
def gathered_for_generation(policy: nn.Module) -> Iterator[None]:
    """The sharded policy's full weights on every rank for the length of a `generate` call.

    Without it each decoding step would all-gather every layer again (reshard after forward).
    A no-op for an unsharded policy. Resharding after forward is switched back on after, as
    dist=fsdp always sets it (full shard).
    """
    partitioned = zero3_params(policy)
    if partitioned:  # ZeRO-3: gathered once, partitioned again after
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            yield
        return
    units = fsdp_units(policy)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


@contextmanager
def gathered_to_modify(module: nn.Module) -> Iterator[None]:
    """`module`'s whole parameters, to change in place: under ZeRO-3 (loaded partitioned) each
    rank holds an empty placeholder, so they are gathered and rank 0's values partitioned back
    after. Elsewhere, nothing to do."""
    partitioned = zero3_params(module)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def full_state_dict(module: nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """`module`'s full state dict, gathered on CPU on rank 0 (empty elsewhere); every rank must call it.

    Args:
        module: a sharded module.
        trained_only: only the parameters that train (a LoRA adapter's), not the frozen base.
    """
    partitioned = zero3_params(module)
    if partitioned:
        import deepspeed

        wanted = [p for p in partitioned if p.requires_grad] if trained_only else partitioned
        with deepspeed.zero.GatheredParameters(wanted):
            if torch.distributed.get_rank() != 0:
                return {}
            if trained_only:
                return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
            return {n: t.detach().cpu().clone() for n, t in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(module, options=options)


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> Any:
    """Loads full tensors (as saved) into a sharded `module`, each rank keeping its shard (strict=False)."""
    if zero3_params(module):  # ZeRO-3: loaded whole, rank 0's copy partitioned to every rank after
        with gathered_to_modify(module):
            return module.load_state_dict(state_dict, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(
        module, state_dict, options=StateDictOptions(full_state_dict=True, strict=False)
    )


@contextmanager
def loading_full_tensors(module: nn.Module) -> Iterator[None]:
    """Makes `module.load_state_dict` (as peft's `set_peft_model_state_dict` calls it, with the
    adapter's keys already renamed to the model's) load full tensors into the shards."""

    def load(state_dict, strict: bool = True, assign: bool = False):
        del module.load_state_dict  # torch's own loader, which set_model_state_dict calls, again
        return load_full_state_dict(module, state_dict)

    module.load_state_dict = load
    try:
        yield
    finally:
        module.__dict__.pop("load_state_dict", None)


def local_and_total_numel(module: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the full model): what shows a model is sharded."""
    local = total = 0
    for param in module.parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of it
            total += param.ds_numel
            local += param.ds_tensor.numel()
            continue
        total += param.numel()
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return local, total
