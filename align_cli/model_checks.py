"""Checks of a model that read no weights: LoRA's `target_modules` against the model's Linear
layers (built on the meta device from its config), and weight files whose safetensors headers
are unreadable or whose data is cut short. `align train` runs them before loading anything.
"""

from __future__ import annotations

import json
import os

from .config import ModelConfig, PeftConfig
from .errors import AlignError
from .modeling import adapter_base, quiet_transformers, resolve_model_path


def meta_model(model_cfg: ModelConfig, path: str):
    """The model at `path` (its adapter's base for a LoRA folder) built from its config on the
    meta device: its classes and module names, no weights read or allocated.

    Raises:
        Exception: whatever transformers raises when the config cannot be read or built here
            (a hub id offline, an unknown architecture); callers decide what that means.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = adapter_base(path) or path
    config = AutoConfig.from_pretrained(
        base, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    with torch.device("meta"), quiet_transformers():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def _module_names(model_cfg: ModelConfig, path: str) -> list[str] | None:
    """Every module name of the model at `path`, from its config alone (`meta_model`); None when
    the config cannot be read here."""
    try:
        model = meta_model(model_cfg, path)
    except Exception:  # a hub id offline, an exotic architecture: peft will judge when it loads
        return None
    return [name for name, _ in model.named_modules() if name]


def check_target_modules(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> None:
    """Refuses `peft.target_modules` that name no module of the model, before any weights load.

    peft matches a name to every module whose dotted name ends with it (`q_proj` matches
    `model.layers.0.self_attn.q_proj`); a name that matches nothing fails deep inside peft.
    A sequence-classification model (rm, the PPO critic) also has its head, `score`.

    Raises:
        AlignError: naming the unmatched entries, the nearest valid names and the Linear ones.
    """
    targets = peft_cfg.target_modules
    if peft_cfg.method != "lora" or isinstance(targets, str):
        return  # "all-linear", or a regex (peft's other string form): peft resolves it
    names = _module_names(model_cfg, resolve_model_path(model_cfg))
    if names is None:
        return
    leaves = {n.rsplit(".", 1)[-1] for n in names} | {"score"}
    missing = [
        t for t in targets if t not in leaves and not any(n.endswith(f".{t}") or n == t for n in names)
    ]
    if missing:
        from .errors import nearest

        linear = sorted({n.rsplit(".", 1)[-1] for n in names if "proj" in n or n.endswith(("fc1", "fc2"))})
        raise AlignError(
            f"peft.target_modules: {', '.join(missing)} names no module of {model_cfg.name_or_path}"
            f"{nearest(missing[0], leaves)}; its projection layers: {', '.join(linear) or '(none)'} "
            "(or peft.target_modules=all-linear)"
        )


def check_weight_files(path: str) -> None:
    """Reads the header of every weight file of a local model folder, so a truncated or garbage
    `model.safetensors` is one line naming the file rather than a traceback from the loader.

    Pickled `.bin` files are loaded by transformers with `weights_only=True`; whether they pass
    is only known when they load (see `load_model`).

    Raises:
        AlignError: a safetensors file whose header cannot be read or whose data is shorter
            than the header says.
    """
    base = adapter_base(path)
    for folder in dict.fromkeys([path, base] if base and os.path.isdir(base) else [path]):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                _check_safetensors(os.path.join(folder, name))


def _check_safetensors(file: str) -> None:
    import struct

    hint = "the file is damaged or incomplete (an interrupted copy or download?): copy or save it again"
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("its header is longer than the file")
            header = json.loads(f.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        why = str(err) if isinstance(err, ValueError) and "header" in str(err) else "no safetensors header"
        raise AlignError(f"{file} is not a readable safetensors file ({why}): {hint}") from None
    if 8 + length + end != size:
        raise AlignError(
            f"{file} is {size} bytes, but its header describes {8 + length + end}: {hint}"
        ) from None
