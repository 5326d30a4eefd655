"""Builds the tiny model's tokenizer, shipped in align_cli/assets/tiny_tokenizer/.

    python scripts/make_tiny_tokenizer.py

A byte-level BPE (so any English or Chinese text, or anything else, encodes without unknown
tokens) trained on data_samples/ plus a little general text, with ChatML special tokens and a
chat template, so the tiny model exercises the same code paths as Qwen-style chat models.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "align_cli" / "assets" / "tiny_tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2 uses it. A default system turn is not inserted: a tiny model has no use for it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data_samples").glob("*")):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    texts += ["user", "assistant", "system", "The quick brown fox jumps over the lazy dog.", "你好,世界。"]
    return texts


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(json.dumps({"vocab_size": len(fast), "dir": str(OUT)}))


if __name__ == "__main__":
    main()
