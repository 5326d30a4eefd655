"""Token lengths of converted rows: prompts as the trainer renders them, and their answers.

Used by `align data validate` (percentiles per field) and by `align train` before any model
is loaded: a prompt that fills `model.max_length` on its own leaves no token for the answer,
so the row would train on nothing (or on a truncated prompt) without anyone noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Fields holding answers in each standard format (see formats.py); `prompt` is measured apart.
ANSWER_FIELDS = {
    "sft": ("completion",),
    "preference": ("chosen", "rejected"),
    "kto": ("completion",),
    "pointwise": ("completion",),
    "listwise": ("completions",),
    "prompt": (),
}


def _content(answer: Any) -> str:
    """An answer's text: a plain string, or the contents of its (assistant) messages."""
    if isinstance(answer, str):
        return answer
    return "".join(m["content"] for m in answer)


def _render_prompt(prompt: Any, tokenizer) -> str:
    """The prompt as the trainer sees it: chat-templated with the assistant header, or as is."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in prompt)


def _count(texts: list[str], tokenizer, chunk: int = 1024) -> list[int]:
    """Token counts without special tokens; in chunks, so a big dataset never sits in memory twice."""
    from ..modeling import quiet_transformers  # counting long texts is the point

    out: list[int] = []
    with quiet_transformers():
        for start in range(0, len(texts), chunk):
            ids = tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
            out += [len(x) for x in ids]
    return out


def split_row(row: dict, standard: str) -> tuple[Any, list[tuple[str, Any]]]:
    """(prompt, [(field, answer), ...]) of a converted row; `messages` rows split at the last turn."""
    if "text" in row and "prompt" not in row:  # plain text (sft): no prompt, all of it is trained on
        return "", [("text", row["text"])]
    if "messages" in row:  # sft conversations: everything before the last assistant turn is the prompt
        msgs = row["messages"]
        return msgs[:-1], [("completion", msgs[-1]["content"])]
    answers = []
    for name in ANSWER_FIELDS.get(standard, ()):
        value = row.get(name)
        if name == "completions":
            answers += [(name, v) for v in value]
        elif value is not None:
            answers.append((name, value))
    return row["prompt"], answers


@dataclass
class Lengths:
    """Token lengths per field, row by row (`prompt[i]` belongs to row i)."""

    prompt: list[int] = field(default_factory=list)
    answers: dict[str, list[int]] = field(default_factory=dict)
    longest: list[int] = field(default_factory=list)  # prompt + its longest answer, per row


def measure(rows: list[dict], standard: str, tokenizer, prompts_only: bool = False) -> Lengths:
    """Counts the tokens of every prompt (and, unless `prompts_only`, every answer)."""
    prompts, answer_texts, owners = [], {}, {}
    for i, row in enumerate(rows):
        prompt, answers = split_row(row, standard)
        prompts.append(_render_prompt(prompt, tokenizer))
        if prompts_only:
            continue
        for name, value in answers:
            answer_texts.setdefault(name, []).append(_content(value))
            owners.setdefault(name, []).append(i)
    out = Lengths(prompt=_count(prompts, tokenizer))
    best = [0] * len(rows)
    for name, texts in answer_texts.items():
        counts = _count(texts, tokenizer)
        out.answers[name] = counts
        for owner, n in zip(owners[name], counts, strict=True):
            best[owner] = max(best[owner], n)
    out.longest = [p + a for p, a in zip(out.prompt, best, strict=True)]
    return out


def too_long(prompt_lengths: list[int], limit: int) -> list[int]:
    """Indices of prompts longer than `limit` tokens."""
    return [i for i, n in enumerate(prompt_lengths) if n > limit]


def percentiles(values: list[int], qs=(50, 90, 99)) -> dict[str, int]:
    """Nearest-rank percentiles and the maximum ({} for no values)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs}
    out["max"] = ordered[-1]
    return out
