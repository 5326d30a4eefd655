"""`align export <run folder> <out dir> [dtype=bfloat16]`: one plain model folder from a run.

The result loads with plain `from_pretrained` (no peft), so transformers, vLLM, TGI or a
llama.cpp conversion take it as any other model:

- a LoRA run: the adapter merged into its base (loaded the way training loads it, `modeling.load_model`);
- a QLoRA run (`quant=4bit|8bit` in the run's `.hydra/config.yaml`): the base loaded quantized as
  in training, dequantized to `dtype` first, then the adapter merged, so the weights are the
  ones the adapter was trained against;
- a reward model: a sequence classifier with one output (`num_labels=1` in its config);
- a folder that already holds a full model: its files copied as they are (with a note), unless
  `dtype` asks for another precision than the one saved.

The folder gets safetensors shards, the tokenizer with its chat template, the generation config
and a model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from .config import ModelConfig, QuantConfig
from .errors import AlignError

USAGE = "align export <run folder> <out dir> [dtype=auto|float32|bfloat16|float16] [max_shard_size=5GB]"

# What a run folder holds besides the model: not part of an exported model.
RUN_FILES = {
    "README.md",
    "metrics.jsonl",
    "summary.json",
    "train.log",
    "training_args.bin",
    "training_curves.svg",
    "samples.jsonl",
    "trainer_state.json",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExportOptions:
    dtype: str = "auto"  # auto: the dtype the (base) weights were saved in
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False
    quiet: bool = False


def run_config(folder: str) -> dict:
    """The composed config of the run that wrote `folder` ({} for a folder align did not write)."""
    path = os.path.join(folder, ".hydra", "config.yaml")
    if not os.path.exists(path) and os.path.basename(os.path.normpath(folder)).startswith("checkpoint-"):
        path = os.path.join(os.path.dirname(os.path.normpath(folder)), ".hydra", "config.yaml")  # its run's
    if not os.path.exists(path):
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def saved_dtype(folder: str) -> str:
    """The dtype a model folder's config.json records (float32 when it does not say)."""
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        value = config.get("dtype") or config.get("torch_dtype")
        if value in DTYPES:
            return value
    return "float32"


def _check_target(src: str, out: str) -> None:
    if os.path.abspath(out) == os.path.abspath(src):
        raise AlignError(f"align export: the out dir {out} is the run folder itself: give a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise AlignError(f"align export: {out} already exists and is not empty: give a new or empty folder")


def _copy_full(src: str, tmp: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name not in RUN_FILES:
            shutil.copy2(path, os.path.join(tmp, name))
            copied.append(name)
    return copied


def _merged(src: str, kind: str, dtype: str, run_quant: dict, opts: ExportOptions):
    """The adapter in `src` merged into its base, in `dtype` (a QLoRA base dequantized first)."""
    from peft import PeftModel

    from . import modeling

    base = modeling.adapter_base(src)
    if not modeling.holds_model(os.path.expanduser(base)) and modeling.looks_local(base):
        raise AlignError(
            f"align export: the adapter in {src} names its base {base}, which does not exist here: "
            "put the base model back at that path"
        )
    model_cfg = ModelConfig(name_or_path=base, dtype=dtype, trust_remote_code=opts.trust_remote_code)
    quant = QuantConfig(**{k: v for k, v in run_quant.items() if k in QuantConfig.__dataclass_fields__})
    if not quant.bits:
        return modeling.load_model(model_cfg, kind=kind, path=src, num_labels=1)
    import torch

    # As in training: the base quantized the same way, so the merge adds the adapter to the weights
    # it learned against (dequantized), not to the unquantized originals.
    with modeling.quiet_transformers():
        quantized = modeling.load_model(model_cfg, quant, kind=kind, num_labels=1)
    dense = quantized.dequantize(dtype=modeling.torch_dtype(dtype))
    model = PeftModel.from_pretrained(dense, src).merge_and_unload()
    return model.to(getattr(torch, dtype) if dtype != "auto" else torch.float32)


def export(src: str, out: str, opts: ExportOptions) -> str:
    """Writes the model of run folder (or model folder) `src` as a plain model folder `out`.

    Returns:
        A one-line note saying what was done.

    Raises:
        AlignError: `src` is not a model folder, `out` is not new or empty, a dtype that is not
            valid, or an adapter whose base is missing.
    """
    from . import card, modeling

    if opts.dtype not in DTYPES:
        raise AlignError(f"align export: dtype={opts.dtype} is not valid: use {', '.join(DTYPES)}")
    expanded = os.path.expanduser(src)
    if not os.path.isdir(expanded) or not modeling.holds_model(expanded):
        raise AlignError(
            f"align export: {src} is not a run folder or model folder (no config.json or adapter_config.json)"
        )
    _check_target(expanded, out)
    task = modeling.adapter_task(expanded)
    run = run_config(expanded)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        if task is None:
            stored = saved_dtype(expanded)
            with open(os.path.join(expanded, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            kind = "seq_cls" if modeling.is_classifier_config(config) else "causal_lm"
            if opts.dtype in ("auto", stored):
                copied = _copy_full(expanded, tmp)
                how = f"{src} already holds a full model: copied its {len(copied)} model files as they are"
                model = None
            else:
                model_cfg = ModelConfig(
                    name_or_path=expanded, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code
                )
                model = modeling.load_model(model_cfg, kind=kind, path=expanded, num_labels=1)
                how = f"{src} holds a full model: re-saved it in {opts.dtype} (it was saved in {stored})"
        else:
            kind = "seq_cls" if task == "SEQ_CLS" else "causal_lm"
            base = modeling.adapter_base(expanded)
            dtype = opts.dtype if opts.dtype != "auto" else saved_dtype(base)
            quant = run.get("quant") or {}
            model = _merged(expanded, kind, dtype, quant, opts)
            what = "reward model (one-output sequence classifier)" if kind == "seq_cls" else "causal LM"
            qlora = f", its {quant['bits']}-bit base dequantized first" if quant.get("bits") else ""
            how = f"merged the LoRA adapter of {src} into its base {base}{qlora}: a full {what} in {dtype}"
        tokenizer = modeling.load_tokenizer(
            ModelConfig(name_or_path=expanded, trust_remote_code=opts.trust_remote_code)
        )
        if model is not None:
            if kind == "seq_cls":
                model.config.num_labels = 1
                model.config.pad_token_id = (
                    tokenizer.pad_token_id
                )  # the classifier finds the last token with it
            else:
                gen = model.generation_config
                gen.pad_token_id = (
                    gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
                )
                gen.eos_token_id = (
                    gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
                )
            model.save_pretrained(tmp, max_shard_size=opts.max_shard_size, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        elif not os.path.exists(os.path.join(tmp, "tokenizer_config.json")):
            tokenizer.save_pretrained(tmp)
        card.write_export_card(tmp, out, expanded, kind, how, run)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return how


def main(argv: list[str]) -> None:
    """Entry for `align export <run folder> <out dir> [key=value ...]`."""
    from . import options

    (src, out), overrides = options.split_args(argv, 2, USAGE)
    opts = options.parse(ExportOptions, overrides, "align export")
    from .serve import quiet_loading

    with quiet_loading():
        how = export(src, out, opts)
    print(f"align: export: {how} -> {out}", flush=True)
