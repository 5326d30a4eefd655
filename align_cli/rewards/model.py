"""A reward model (a sequence-classification model with one output) as a reward function.

    align train method=grpo reward=model reward.model.path=outputs/rm/<run>
    align train method=ppo reward.model.path=OpenAssistant/reward-model-deberta-v3-large-v2

`path` is a hub id, a saved model, or an `rm` run folder as it is (a LoRA adapter folder is
merged into its base). The reward model keeps its own tokenizer, so it may differ from the
policy's: each (prompt, completion) pair is decoded to text and re-tokenized for it, through
its chat template when the data is conversational.

The path is checked before anything loads: a folder that holds no model, a missing local path
that would otherwise be tried as a hub id, or a hub id while offline and not in the hub cache
fail at once, with a message that names the reward's key.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import AlignError
from .base import Reward, message_text


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
        if not any(os.path.exists(os.path.join(expanded, f)) for f in ("config.json", "adapter_config.json")):
            raise AlignError(
                f"{key}={path!r} is a folder without config.json or adapter_config.json: {where}"
            )
        return
    if os.path.exists(expanded):
        raise AlignError(f"{key}={path!r} is a file, not a model folder: {where}")
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant to be local.
    local = path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)
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


class ModelReward(Reward):
    """Scores (prompt, completion) pairs with a reward model's single logit.

    The model is loaded when the reward is built (a bad path fails before training) and
    runs on CPU until `to(device)` moves it beside the policy.
    """

    type = "model"
    main = "path"
    options = {"path": ..., "batch_size": 16, "max_length": None, "dtype": "auto"}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        from ..config import ModelConfig
        from ..modeling import load_model, load_tokenizer

        key = f"reward.{name}.path"
        check_path(str(self.path), key)
        model_cfg = ModelConfig(name_or_path=str(self.path), dtype=str(self.dtype))
        try:
            self.tokenizer = load_tokenizer(model_cfg)
            self.model = load_model(
                model_cfg, kind="seq_cls", num_labels=1, pad_token_id=self.tokenizer.pad_token_id
            )
        except AlignError as err:
            raise AlignError(f"{key}: {err}") from None
        if self.model.config.num_labels != 1:
            raise AlignError(
                f"reward.{name}.path={self.path!r} is a classifier with {self.model.config.num_labels} outputs; "
                "a reward model has exactly one (train one with method=rm)"
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
        conversational = bool(prompts) and isinstance(prompts[0], list) and bool(self.tokenizer.chat_template)
        out = []
        for p, c in zip(prompts, completions, strict=True):
            if conversational:
                ids = tokenize_response(self.tokenizer, _as_messages(p, "user"), _as_messages(c, "assistant"))
            else:
                ids = tokenize_response(self.tokenizer, message_text(p), message_text(c))
            out.append(ids[-self.max_length :])
        return out

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
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
