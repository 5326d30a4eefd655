"""Model and tokenizer loading: the tiny offline model, hub ids, local folders, LoRA and k-bit.

`model.name_or_path=tiny` builds a deterministic Qwen2-architecture model of about 200k
parameters with the tokenizer shipped in `align_cli/assets/tiny_tokenizer/`, caches it under
`$ALIGN_CACHE` (default `~/.cache/align`) and loads it like any other local folder, so the
demo and the tests go through the same code path as a real model, with no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PACKAGE_DIR, ModelConfig, PeftConfig, QuantConfig
from .errors import AlignError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_TOKENIZER_DIR = PACKAGE_DIR / "assets" / "tiny_tokenizer"
# Small enough to train hundreds of steps a minute on 2 CPU cores, big enough to learn the
# sample preferences. Changing it changes the cache key, so old caches are never reused.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def build_tiny_model() -> Path:
    """Builds (once) the tiny offline causal LM and returns its folder."""
    tokenizer_bytes = (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()
    key = hashlib.sha256(json.dumps(TINY_CONFIG, sort_keys=True).encode() + tokenizer_bytes).hexdigest()[:12]
    target = cache_dir() / f"tiny-qwen2-{key}"
    if (target / "config.json").exists():
        return target

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_CONFIG,
    )
    # A private generator keeps the weights identical across runs without touching the
    # global RNG the caller may have seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent processes (DDP ranks, parallel tests)
    # never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    from transformers.utils import logging as hf_logging

    # Our own build, whenever the first command needs it: no "Writing model shards" bar.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # Written file by file: under torchrun, transformers' `save_pretrained` writes weights on
        # global rank 0 only, and a rank 1 that built the model first would rename a folder
        # without them into the cache.
        from safetensors.torch import save_file

        # What save_pretrained records beside the config: the class and the weights' dtype.
        model.config.architectures = [type(model).__name__]
        model.config.dtype = next(model.parameters()).dtype
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        weights, seen = {}, set()
        for name, tensor in model.state_dict().items():  # a tied weight once, under its first name
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                weights[name] = tensor.contiguous()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def holds_model(folder: str) -> bool:
    """Whether a folder holds a saved model or a LoRA adapter."""
    return any(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "adapter_config.json"))


def looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant to be local.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def resolve_model_path(model_cfg: ModelConfig, path: str | None = None) -> str:
    """Returns a loadable local folder or hub id; `tiny` builds the offline model.

    Raises:
        AlignError: a local-looking path that does not exist.
    """
    path = path or model_cfg.name_or_path
    if path == "tiny":
        return os.path.abspath(build_tiny_model())
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not holds_model(expanded):
            raise AlignError(
                f"model path '{path}' is a folder without config.json or adapter_config.json: "
                "point model.name_or_path at a saved model, a run folder, or a hub id"
            )
        # Absolute: a LoRA adapter trained on it records this path as its base, and must load
        # from any working directory.
        return os.path.abspath(expanded)
    if os.path.exists(expanded) or looks_local(path):
        raise AlignError(
            f"model path '{path}' does not exist: use model=tiny, a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct, or an existing folder"
        )
    return path


def _hub_error(path: str, err: Exception) -> AlignError:
    return AlignError(
        f"could not load model '{path}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
        "(no local folder by that name; loading from the hub needs network access and a valid id)"
    )


def _weights_error(path: str, err: Exception) -> Exception:
    """A weight file the loader refused, as one line naming it; other errors pass unchanged."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return AlignError(
            f"model '{path}': its pickled weights (.bin) hold more than tensors, so torch refuses to load "
            f"them (weights_only=True, which keeps a file from running code); "
            "load a safetensors copy, or re-save the weights as safetensors from a source you trust"
        )
    if type(err).__name__ == "SafetensorError" or "safetensors" in type(err).__module__:
        return AlignError(
            f"model '{path}': a safetensors file cannot be read ({one_line(str(err))}); it is damaged or "
            "incomplete: copy or save it again"
        )
    return err


def load_tokenizer(model_cfg: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """Loads the tokenizer, with a pad token and (if configured) an overriding chat template."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg, path)
    source = path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        source = adapter_base(path) or path  # an adapter folder saved without its tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(source, err) from None
    if tokenizer.pad_token is None:
        # Padding is masked out everywhere, so reusing EOS is safe and avoids resizing embeddings.
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.chat_template:
        template = model_cfg.chat_template
        if os.path.isfile(os.path.expanduser(template)):
            template = Path(os.path.expanduser(template)).read_text(encoding="utf-8")
        tokenizer.chat_template = template
    return tokenizer


def adapter_base(path: str) -> str | None:
    """The base model an adapter-only folder names (`base_model_name_or_path`), else None."""
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.exists(adapter_cfg) and not os.path.exists(os.path.join(path, "config.json")):
        with open(adapter_cfg, encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    return None


def adapter_task(path: str) -> str | None:
    """The PEFT task type of an adapter-only folder (e.g. "CAUSAL_LM", "SEQ_CLS"), else None."""
    if adapter_base(path) is None:
        return None
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f).get("task_type") or "CAUSAL_LM"


def merge_adapter_folder(model_cfg: ModelConfig, path: str, target: str) -> str:
    """Writes `path` (an adapter-only folder) merged into its base model as a full model at `target`.

    A merged folder can be loaded quantized, as another head type (a critic from a causal-LM
    adapter), or serve as the base of a new adapter whose `base_model_name_or_path` must name
    the weights it was trained on. An existing `target` (a resumed run) is reused.
    """
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    kind = "seq_cls" if adapter_task(path) == "SEQ_CLS" else "causal_lm"
    model = load_model(model_cfg, kind=kind, path=path)  # merged in memory, unquantized
    base = adapter_base(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    # Written beside the target and renamed, as the tiny model is: DDP ranks may race here.
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".merging-")
    model.save_pretrained(tmp)
    tokenizer_dir = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else base
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=model_cfg.trust_remote_code
        ).save_pretrained(tmp)
    except OSError:
        pass  # a base without a tokenizer on disk: the run's tokenizer is saved with the outputs anyway
    try:
        os.rename(tmp, target)
    except OSError:  # another rank finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise AlignError(
            f"model.dtype={name!r} is not valid: use auto, float32, bfloat16 or float16"
        ) from None


def check_bitsandbytes() -> None:
    """Raises a one-line AlignError when bitsandbytes cannot run here."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a native library that fails to load
        raise AlignError(
            f"quant=4bit/8bit needs bitsandbytes, which cannot be loaded here ({type(err).__name__}: {err}); "
            "install it with `pip install bitsandbytes` or use quant=none"
        ) from None


def bnb_config(quant_cfg: QuantConfig):
    """The BitsAndBytesConfig for `quant=4bit|8bit`, or None."""
    if not quant_cfg.bits:
        return None
    if quant_cfg.bits not in (4, 8):
        raise AlignError(f"quant.bits={quant_cfg.bits} is not valid: use null, 4 or 8")
    check_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quant_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant_cfg.quant_type not in ("nf4", "fp4"):
        raise AlignError(f"quant.quant_type={quant_cfg.quant_type!r} is not valid: use nf4 or fp4")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant_cfg.compute_dtype),
    )


@contextmanager
def quiet_transformers():
    """Silences transformers' warnings where they are expected: the load report of a model whose
    missing weights come next (a classification head a LoRA adapter or the caller provides), or
    the tokenizer's length warning while counting tokens of long texts."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_model(
    model_cfg: ModelConfig,
    quant_cfg: QuantConfig | None = None,
    kind: str = "causal_lm",
    path: str | None = None,
    num_labels: int = 1,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Loads a causal LM or a sequence-classification model (`kind="seq_cls"`).

    A folder holding only a LoRA adapter (a `peft=lora` run folder) loads its base model and
    merges the adapter, so later stages start from what that run trained.

    Args:
        model_cfg: the model settings; `path` overrides `model_cfg.name_or_path`.
        quant_cfg: bitsandbytes quantization, or None.
        kind: "causal_lm" or "seq_cls".
        path: a model path or hub id to load instead of the configured one.
        num_labels: outputs of the classification head (reward models use 1).
        pad_token_id: written into the config (sequence classification finds the last token with it).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg, path)
    quant = bnb_config(quant_cfg) if quant_cfg is not None else None
    kwargs: dict[str, Any] = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": torch_dtype(model_cfg.dtype),
    }
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
    if kind == "seq_cls":
        cls, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    elif kind == "causal_lm":
        cls = AutoModelForCausalLM
    else:
        raise ValueError(f"unknown model kind {kind!r}")

    base = adapter_base(path)
    if kind == "causal_lm":
        _refuse_classifier(path)
    try:
        if base is not None:
            if quant is not None:
                raise AlignError(
                    f"'{path}' holds a LoRA adapter; quantized loading needs a full model: load it with "
                    "quant=none, or merge the adapter into its base first"
                )
            from peft import PeftModel

            with quiet_transformers() if kind == "seq_cls" else nullcontext():  # the adapter has the head
                base_model = cls.from_pretrained(base, **kwargs)
            model = PeftModel.from_pretrained(base_model, path).merge_and_unload()
            model.requires_grad_(True)  # peft loads the adapter frozen; the merged model trains as any other
        else:
            model = cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(base or path, err) from None
    except Exception as err:
        mapped = _weights_error(base or path, err)
        if mapped is err:
            raise
        raise mapped from None
    if quant is not None:
        from .compat import keep_4bit_trainable

        keep_4bit_trainable(model)  # before any forward: eval passes must not repack the weights
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def is_classifier_config(config: dict) -> bool | None:
    """Whether a config.json describes a sequence classifier; None when it does not say."""
    if "AutoModelForSequenceClassification" in (config.get("auto_map") or {}):
        return True
    architectures = config.get("architectures") or []
    if not architectures:
        return None
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def _refuse_classifier(path: str) -> None:
    """A reward model (a sequence classifier) has no language-model head to generate or train as a
    policy with: say so, instead of a traceback or a silently new head."""
    if not os.path.isdir(path):
        return  # a hub id: transformers decides
    classifier = adapter_task(path) == "SEQ_CLS"
    config = os.path.join(path, "config.json")
    if not classifier and os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            classifier = bool(is_classifier_config(json.load(f)))
    if classifier:
        raise AlignError(
            f"model '{path}' is a reward model (a sequence classifier), not a language model: start a policy "
            "from a base or SFT model, and pass the reward model as reward=model reward.model.path=<folder>"
        )


def lora_config(peft_cfg: PeftConfig, task_type: str = "CAUSAL_LM"):
    """A peft.LoraConfig for `peft=lora`, None for `peft=none`."""
    if peft_cfg.method == "none":
        return None
    if peft_cfg.method != "lora":
        raise AlignError(f"peft.method={peft_cfg.method!r} is not valid: use none or lora")
    from peft import LoraConfig

    targets = peft_cfg.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        modules_to_save=list(peft_cfg.modules_to_save) if peft_cfg.modules_to_save else None,
        task_type=task_type,
    )
