"""A reward model (a sequence-classification model with one output) as a reward function.

    align train method=grpo reward=model reward.model.path=outputs/rm/<run>
    align train method=ppo reward.model.path=OpenAssistant/reward-model-deberta-v3-large-v2

`path` is a hub id, a saved model, or an `rm` run folder as it is (a LoRA adapter folder is
merged into its base). The reward model keeps its own tokenizer, so it may differ from the
policy's: each (prompt, completion) pair is decoded to text and re-tokenized for it, through
its chat template when the data is conversational (as plain text when it has none).

The path is checked before anything loads: a folder that holds no model, a missing local path
that would otherwise be tried as a hub id, or a hub id while offline and not in the hub cache
fail at once; and the checkpoint must hold a trained one-output head. A causal LM (a base
model, an SFT run) would load as a classifier with a random head, score noise and train
nothing, so it is refused with the key to fix. PPO's critic starts from this same checked model.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import AlignError
from ..modeling import holds_model, is_classifier_config, looks_local
from .base import Reward, message_text

# What to do instead, at the end of every "not a reward model" message.
REWARD_MODEL_HINT = (
    "train one with `align train method=rm`, or pass a sequence-classification model with one output"
)


def check_path(path: str, key: str) -> None:
    """Fails fast, naming `key`, on a path that cannot be a loadable model.

    Mirrors what the model loader would find, without its slow failures: a hub-id-looking path
    whose first part is a local folder (`runs/nonexist` beside a `runs/`) is a missing local
    path, not a hub id to retry for a minute; offline (HF_HUB_OFFLINE), a hub id is only
    loadable from the hub cache.

    Raises:
        AlignError: a folder without config.json or adapter_config.json, a file, a missing
            local path, or a hub id that cannot be loaded offline.
    """
    if path == "tiny":
        return
    expanded = os.path.expanduser(path)
    where = f"point {key} at an `rm` run folder, a saved reward model, or a hub id"
    if os.path.isdir(expanded):
        if not holds_model(expanded):
            raise AlignError(
                f"{key}={path!r} is a folder without config.json or adapter_config.json: {where}"
            )
        return
    if os.path.exists(expanded):
        raise AlignError(f"{key}={path!r} is a file, not a model folder: {where}")
    local = looks_local(path)
    first = path.split("/", 1)[0]
    if local or ("/" in path and os.path.isdir(first)):
        why = "" if local else f" (there is a local folder '{first}/', so it is not taken for a hub id)"
        raise AlignError(f"{key}={path!r} does not exist{why}: {where}")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.is_offline_mode():
        try:
            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except ValueError:  # not a valid repo id either
            cached = False
        if not cached:
            raise AlignError(
                f"{key}={path!r} is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE is set, "
                f"so it cannot be downloaded: {where} that is cached (or unset HF_HUB_OFFLINE)"
            )


def _num_labels(config: dict) -> int:
    # As transformers reads it: id2label decides, then num_labels, then its default of 2.
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise AlignError(f"{path} is not valid JSON: {err}") from None


def _config(path: str, key: str) -> dict:
    """config.json of a local folder or a hub id (from the hub cache or a download)."""
    if os.path.isdir(path):
        return _read_json(os.path.join(path, "config.json"))
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(path)[0]
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise AlignError(f"{key}={path!r} could not be loaded: {type(err).__name__}: {first}") from None


def check_checkpoint(path: str, key: str, shown: str | None = None) -> None:
    """Refuses, before loading, a checkpoint whose config says it is no one-output classifier.

    Args:
        path: a resolved model path: a local folder (a saved model or a LoRA adapter) or a hub id.
        key: the setting that names it, for the message.
        shown: the value as the user wrote it (default: `path`).

    Raises:
        AlignError: a causal LM (or another non-classifier), a LoRA adapter trained for another
            task than sequence classification, or a classifier with more than one output.
    """
    shown = path if shown is None else shown
    adapter_file = os.path.join(path, "adapter_config.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        adapter = _read_json(adapter_file) if os.path.exists(adapter_file) else {}
        if adapter.get("task_type") != "SEQ_CLS":
            raise AlignError(
                f"{key}={shown!r} has no trained classification head: it holds a LoRA adapter for "
                f"task_type {adapter.get('task_type')} (e.g. an SFT run), not a reward model; {REWARD_MODEL_HINT}"
            )
        # An `rm` run saves its trained head beside the adapter (modules_to_save); without one,
        # only a base model that is a classifier itself has a head to keep.
        saved = [f".{m}." for m in adapter.get("modules_to_save") or ()]
        names = _tensor_names(path, "adapter_model")
        if names is not None and not any(m in f".{n}" for m in saved for n in names):
            base = adapter.get("base_model_name_or_path")
            config = _config(base, key) if base else {}
            if not is_classifier_config(config):
                raise AlignError(
                    f"{key}={shown!r} has no trained classification head: its LoRA adapter saves none "
                    f"(no modules_to_save weights) and its base {base!r} is "
                    f"{', '.join(config.get('architectures') or ['no classifier'])}; {REWARD_MODEL_HINT}"
                )
        return
    config = _config(path, key)
    classifier = is_classifier_config(config)
    if classifier is False:
        arch = ", ".join(config["architectures"])
        kind = (
            "a causal LM, e.g. a base model or an SFT run" if "CausalLM" in arch else "no sequence classifier"
        )
        raise AlignError(
            f"{key}={shown!r} has no trained classification head: it is a {arch} ({kind}), not a reward model; "
            f"{REWARD_MODEL_HINT}"
        )
    if classifier and _num_labels(config) != 1:
        raise AlignError(
            f"{key}={shown!r} is a classifier with {_num_labels(config)} outputs; a reward model has exactly one "
            "(train one with `align train method=rm`)"
        )


def _tensor_names(folder: str, stem: str) -> set[str] | None:
    """Names of the tensors `folder` stores as `<stem>.safetensors` (or sharded, or .bin); None if unknown."""
    indexes = [f"{stem}.safetensors.index.json"] + (
        ["pytorch_model.bin.index.json"] if stem == "model" else []
    )
    for index in indexes:
        if os.path.exists(os.path.join(folder, index)):
            return set(_read_json(os.path.join(folder, index)).get("weight_map", {}))
    file = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(file):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:  # reads the header only
            return set(f.keys())
    file = os.path.join(folder, "pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if os.path.exists(file):
        import torch

        try:
            return set(torch.load(file, map_location="meta", weights_only=True))
        except Exception:  # an unreadable or unusual file: leave the loader to judge
            return None
    return None


def stored_weights(path: str) -> set[str] | None:
    """Parameter names a local checkpoint stores, as the loaded (merged) model names them.

    A LoRA adapter folder stores its trained copies of `modules_to_save` (the head of an `rm`
    run) as `base_model.model.<name>`; its base supplies the rest. None when it cannot tell
    (a hub id, an unknown file layout).
    """
    if not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, "config.json")):
        return _tensor_names(path, "model")
    adapter = _tensor_names(path, "adapter_model")
    if adapter is None:
        return None
    names = {n.removeprefix("base_model.model.") for n in adapter}
    base = _read_json(os.path.join(path, "adapter_config.json")).get("base_model_name_or_path")
    base_names = stored_weights(base) if base else None
    return names | (base_names or set())


def head_parameters(model) -> list[str]:
    """Names of a sequence classifier's head parameters: those outside its base model."""
    prefix = f"{model.base_model_prefix}."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def _as_messages(item: Any, role: str) -> list[dict]:
    if isinstance(item, list):
        return list(item)
    return [{"role": role, "content": "" if item is None else str(item)}]


def tokenize_response(tokenizer, prompt, response) -> list[int]:
    """Token ids of prompt + response, laid out as TRL's RewardTrainer lays out chosen/rejected.

    Conversational rows go through the chat template; plain text gets the EOS token appended.
    Training (every `method=rm` mode) and scoring (this reward) both use this one function, so a
    reward model always reads the layout it was trained on.
    """
    if isinstance(prompt, list):
        return list(
            tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
        )
    eos = tokenizer.eos_token or ""
    text = prompt + response
    if eos and not text.endswith(eos):
        text += eos
    return list(tokenizer(text=text)["input_ids"])


def check_entry(name: str, options: dict[str, Any]) -> None:
    """Checks a reward-model entry as `ModelReward` would, without loading its weights: its
    options, its path and the checkpoint's config (a one-output classifier).

    Raises:
        AlignError: an unknown or missing option, a path that cannot hold a model, or a
            checkpoint that is no reward model.
    """
    from ..config import ModelConfig
    from ..model_checks import check_weight_files
    from ..modeling import resolve_model_path

    probe = Reward.__new__(ModelReward)
    Reward.__init__(probe, name, **options)  # the option checks only
    quant_bits(name, probe.quant)
    key = f"reward.{name}.path"
    check_path(str(probe.path), key)
    try:
        path = resolve_model_path(ModelConfig(name_or_path=str(probe.path)))
        check_checkpoint(path, key, str(probe.path))
        check_weight_files(path)
    except AlignError as err:
        if str(err).startswith(key):
            raise
        raise AlignError(f"{key}: {err}") from None


def _load(model_cfg, path: str, quant_cfg, tokenizer):
    """The reward model; an adapter folder (a `peft=lora` rm run) is merged into a scratch folder
    first when it is loaded quantized (bitsandbytes quantizes a full model as it loads)."""
    import shutil
    import tempfile

    from ..compat import outside_zero3
    from ..modeling import adapter_base, load_model, merge_adapter_folder

    scratch = None
    if quant_cfg is not None and adapter_base(path) is not None:
        scratch = tempfile.mkdtemp(prefix="align-rm-")
        path = merge_adapter_folder(model_cfg, path, os.path.join(scratch, "model"))
    try:
        # Whole on every rank under dist=zero3 too: reward functions call it per rank.
        with outside_zero3():
            return load_model(
                model_cfg,
                quant_cfg,
                kind="seq_cls",
                path=path,
                num_labels=1,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


QUANTS = {"none": None, "4bit": 4}  # reward.<name>.quant -> bits


def quant_bits(name: str, quant: Any) -> int | None:
    """The bits of `reward.<name>.quant` (None: full precision); raises a one-line AlignError for a bad value."""
    key = "none" if quant is None else str(quant)
    if key not in QUANTS:
        raise AlignError(
            f"reward.{name}.quant={quant!r} is not valid: use none (full precision) or 4bit (NF4, bitsandbytes)"
        )
    return QUANTS[key]


class ModelReward(Reward):
    """Scores (prompt, completion) pairs with a reward model's single logit.

    The model is loaded when the reward is built (a bad path fails before training) and
    runs on CPU until `to(device)` moves it beside the policy. `quant=4bit` loads it in NF4
    (bitsandbytes; a frozen model loses little to it), e.g. PPO's `method.frozen_quant=4bit`.
    """

    type = "model"
    main = "path"
    options = {"path": ..., "batch_size": 16, "max_length": None, "dtype": "auto", "quant": "none"}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        from ..config import ModelConfig, QuantConfig
        from ..modeling import load_tokenizer, resolve_model_path

        key = f"reward.{name}.path"
        bits = quant_bits(name, self.quant)
        check_path(str(self.path), key)
        model_cfg = ModelConfig(name_or_path=str(self.path), dtype=str(self.dtype))
        try:
            path = resolve_model_path(model_cfg)
            check_checkpoint(path, key, str(self.path))
            self.tokenizer = load_tokenizer(model_cfg)
            self.model = _load(model_cfg, path, QuantConfig(bits=bits) if bits else None, self.tokenizer)
        except AlignError as err:
            if str(err).startswith(key):
                raise
            raise AlignError(f"{key}: {err}") from None
        stored = stored_weights(path)
        head = head_parameters(self.model)
        if stored is not None and head and not any(n in stored for n in head):
            raise AlignError(
                f"{key}={self.path!r} has no trained classification head: its checkpoint stores no "
                f"{', '.join(head)}, so the head would be random; {REWARD_MODEL_HINT}"
            )
        self.model.eval().requires_grad_(False)
        # Too-long inputs lose their start, not the completion the score is about.
        self.tokenizer.truncation_side = "left"
        # Tokenizers without a limit report a huge model_max_length; cap it at something sane.
        self.max_length = int(
            self.max_length or min(getattr(self.tokenizer, "model_max_length", 0) or 2048, 32768)
        )

    def to(self, device: Any) -> ModelReward:
        """Moves the reward model (e.g. next to the policy); returns self."""
        self.model.to(device)
        return self

    def input_ids(self, prompts: list, completions: list) -> list[list[int]]:
        """What the reward model reads for each pair, truncated from the left to max_length."""
        out = []
        for p, c in zip(prompts, completions, strict=True):
            if not isinstance(p, list):
                ids = tokenize_response(self.tokenizer, message_text(p), message_text(c))
            elif self.tokenizer.chat_template:
                ids = tokenize_response(self.tokenizer, _as_messages(p, "user"), _as_messages(c, "assistant"))
            else:  # no chat template: the whole conversation, the completion's turn last, as text
                ids = tokenize_response(self.tokenizer, message_text(p + _as_messages(c, "assistant")), "")
            out.append(ids[-self.max_length :])
        return out

    def compute(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        import torch

        rows = self.input_ids(prompts, completions)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        scores: list[float | None] = []
        for start in range(0, len(rows), int(self.batch_size)):
            chunk = rows[start : start + int(self.batch_size)]
            width = max(len(r) for r in chunk)
            # Right padding: sequence classification reads the last non-pad token.
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits  # (batch, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores
