"""A reward model (a sequence-classification model with one output) as a reward function.

    align train method=grpo reward=model reward.model.path=outputs/rm/<run>
    align train method=ppo reward.model.path=OpenAssistant/reward-model-deberta-v3-large-v2

`path` is a hub id, a saved model, or an `rm` run folder as it is (a LoRA adapter folder is
merged into its base). The reward model keeps its own tokenizer, so it may differ from the
policy's: each (prompt, completion) pair is decoded to text and re-tokenized for it, through
its chat template when the data is conversational.
"""

from __future__ import annotations

from typing import Any

from ..errors import AlignError
from .base import Reward, message_text


def _as_messages(item: Any, role: str) -> list[dict]:
    if isinstance(item, list):
        return list(item)
    return [{"role": role, "content": "" if item is None else str(item)}]


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

        model_cfg = ModelConfig(name_or_path=str(self.path), dtype=str(self.dtype))
        try:
            self.tokenizer = load_tokenizer(model_cfg)
            self.model = load_model(
                model_cfg, kind="seq_cls", num_labels=1, pad_token_id=self.tokenizer.pad_token_id
            )
        except AlignError as err:
            raise AlignError(f"reward.{name}.path: {err}") from None
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

    def texts(self, prompts: list, completions: list) -> list[str]:
        """The strings the reward model reads: prompt + completion, chat-formatted when conversational."""
        conversational = isinstance(prompts[0], list) if prompts else False
        if conversational and self.tokenizer.chat_template:
            return [
                self.tokenizer.apply_chat_template(
                    _as_messages(p, "user") + _as_messages(c, "assistant"), tokenize=False
                )
                for p, c in zip(prompts, completions, strict=True)
            ]
        return [message_text(p) + message_text(c) for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        import torch

        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(texts), int(self.batch_size)):
            batch = self.tokenizer(
                texts[start : start + int(self.batch_size)],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            with torch.inference_mode():
                logits = self.model(**batch).logits  # (batch, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores
