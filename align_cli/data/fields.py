"""Reading one row's fields for the converters (formats.py, converters.py): typed values named
by their key when wrong, and prompts and answers as chat messages or plain text.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .messages import contents, normalize, tools_json
from .problems import RowError

Row = dict[str, Any]


@dataclass
class ConvertOptions:
    """How rows are converted; `weighted` is set per file, `ignored` counts what was not read.

    Attributes:
        conversational: emit chat messages (the tokenizer has a chat template) or plain text.
        system: `data.system`, the system prompt of rows that have none.
        weighted: some message of the file has OpenAI's `weight`: SFT conversations become one
            prompt/completion row per assistant turn with weight 1.
        ignored: message keys nothing reads, with their counts (said once per file).
    """

    conversational: bool
    system: str | None = None
    weighted: bool = False
    ignored: Counter = field(default_factory=Counter)


def text(row: Row, key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if not isinstance(value, str):
        raise RowError(f"column '{key}' must be a string, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value.strip():
        raise RowError(f"column '{key}' is empty")
    return value


def number(row: Row, key: str) -> float:
    value = row.get(key)
    if isinstance(value, bool):
        raise RowError(f"column '{key}' must be a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RowError(f"column '{key}' must be a number, got {value!r:.60}") from None
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise RowError(f"column '{key}' must be a finite number, got {value!r:.60}")
    return float(value)


def boolean(row: Row, key: str) -> bool:
    value = row.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RowError(f"column '{key}' must be true or false, got {value!r:.60}")


def string_list(row: Row, key: str, min_len: int) -> list[str]:
    value = row.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RowError(f"column '{key}' must be a list of strings, got {type(value).__name__} {value!r:.60}")
    if len(value) < min_len:
        raise RowError(f"column '{key}' must hold at least {min_len} responses, got {len(value)}")
    for i, v in enumerate(value):
        if not v.strip():
            raise RowError(f"column '{key}' item {i} is empty")
    return list(value)


def _messages_prompt(user: str, opts: ConvertOptions, system: str | None = None, history=None) -> list[dict]:
    msgs = []
    if system or opts.system:
        msgs.append({"role": "system", "content": system or opts.system})
    for turn in history or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError("column 'history' must be a list of [user, assistant] string pairs")
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    msgs.append({"role": "user", "content": user})
    return msgs


def row_system(row: Row) -> str | None:
    """The row's `system` column (a system prompt), or None when it has none."""
    return text(row, "system", allow_empty=True) or None if row.get("system") is not None else None


def with_system(msgs: list[dict], row: Row, opts: ConvertOptions) -> list[dict]:
    """Messages with the row's `system` column (else `data.system`) as their first message.

    Raises:
        RowError: the row has both a `system` column and a different system message.
    """
    system = row_system(row)
    if msgs and msgs[0]["role"] == "system":
        if system and msgs[0]["content"] != system:
            raise RowError("the 'system' column and the conversation's own system message differ: keep one")
        return msgs
    system = system or opts.system
    return [{"role": "system", "content": system}, *msgs] if system else msgs


def alpaca_prompt(row: Row, opts: ConvertOptions):
    """The seed's instruction (+ optional input, system, history) as a prompt."""
    instruction = text(row, "instruction")
    extra = text(row, "input", allow_empty=True) if "input" in row else ""
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    system = row_system(row)
    history = row.get("history") or None
    if not opts.conversational:
        parts = [system] if system else []
        for q, a in history or []:
            parts += [q, a]
        return "\n".join(parts + [user])
    return _messages_prompt(user, opts, system, history)


def conversation(value: Any, key: str, opts: ConvertOptions) -> list[dict]:
    """A column holding messages, normalised (see messages.normalize)."""
    return normalize(value, key, opts.ignored)


def plain_prompt(row: Row, opts: ConvertOptions, key: str = "prompt"):
    """TRL's `prompt`: a string, or already a list of messages (+ the row's `system` column)."""
    value = row.get(key)
    if isinstance(value, list):
        msgs = with_system(conversation(value, key, opts), row, opts)
        return msgs if opts.conversational else contents(msgs)
    value = text(row, key)
    if opts.conversational:
        return _messages_prompt(value, opts, row_system(row))
    system = row_system(row)
    return f"{system}\n{value}" if system else value


def answer(row: Row, key: str, opts: ConvertOptions):
    value = row.get(key)
    if isinstance(value, dict) and "role" in value:  # one message instead of a list of them
        value = [value]
    if isinstance(value, list):  # TRL's conversational answers: [{"role": "assistant", ...}]
        msgs = conversation(value, key, opts)
        if msgs[0]["role"] != "assistant":
            raise RowError(
                f"column '{key}' starts with a {msgs[0]['role']} message: an answer is the assistant's "
                "(a conversation that repeats the prompt belongs in a file whose chosen and rejected share it)"
            )
        return msgs if opts.conversational else "".join(m["content"] for m in msgs)
    value = text(row, key)
    return [{"role": "assistant", "content": value}] if opts.conversational else value


def with_tools(row: Row, out: Row, key: str = "tools") -> Row:
    """Adds the row's tool schemas (a JSON string, as TRL passes them to the chat template)."""
    tools = tools_json(row.get(key), key) if key in row else None
    if tools is not None:
        out["tools"] = tools
    return out
