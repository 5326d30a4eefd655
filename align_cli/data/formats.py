"""Dataset formats: the seed's and TRL's input columns, converted to TRL's standard formats.

Each method takes one *standard* format (a method yaml's `format:`):

| standard     | columns produced                        | methods            |
|--------------|-----------------------------------------|--------------------|
| sft          | prompt, completion  (or messages)       | sft                |
| preference   | prompt, chosen, rejected (+ margin)     | dpo, rm pairwise   |
| kto          | prompt, completion, label               | kto                |
| pointwise    | prompt, completion, score               | rm pointwise       |
| listwise     | prompt, completions (best first)        | rm listwise        |
| prompt       | prompt (+ every other column)           | ppo, grpo          |

and accepts several *input* formats (`data.format=<name>`, or detected from the columns).
With a chat template, prompts become conversations (lists of role/content messages) and
answers single assistant messages, which TRL renders with the template; without one they
stay plain text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AlignError

Row = dict[str, Any]


class RowError(ValueError):
    """A problem with one row; the caller adds the row's origin (file:line)."""


@dataclass(frozen=True)
class InputFormat:
    """One way a dataset can be laid out on disk."""

    name: str
    standard: str  # the standard format it converts to
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[Row, ConvertOptions], Row]
    keeps_extra: bool = False  # pass unknown columns through (prompt-only data for reward functions)


@dataclass(frozen=True)
class ConvertOptions:
    conversational: bool
    system: str | None = None


# --------------------------------------------------------------------------------------
# Field helpers


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


# --------------------------------------------------------------------------------------
# Prompts and answers


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


def alpaca_prompt(row: Row, opts: ConvertOptions):
    """The seed's instruction (+ optional input, system, history) as a prompt."""
    instruction = text(row, "instruction")
    extra = text(row, "input", allow_empty=True) if "input" in row else ""
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    system = text(row, "system", allow_empty=True) if row.get("system") else None
    history = row.get("history") or None
    if not opts.conversational:
        parts = [system] if system else []
        for q, a in history or []:
            parts += [q, a]
        return "\n".join(parts + [user])
    return _messages_prompt(user, opts, system, history)


def plain_prompt(row: Row, opts: ConvertOptions):
    """TRL's `prompt`: a string, or already a list of messages."""
    value = row.get("prompt")
    if isinstance(value, list):
        check_messages(value, "prompt")
        if opts.system and value and value[0].get("role") != "system":
            value = [{"role": "system", "content": opts.system}, *value]
        return value if opts.conversational else "\n".join(m["content"] for m in value)
    value = text(row, "prompt")
    return _messages_prompt(value, opts) if opts.conversational else value


def answer(row: Row, key: str, opts: ConvertOptions):
    value = row.get(key)
    if isinstance(value, list):  # TRL's conversational answers: [{"role": "assistant", ...}]
        check_messages(value, key)
        return value if opts.conversational else "".join(m["content"] for m in value)
    value = text(row, key)
    return [{"role": "assistant", "content": value}] if opts.conversational else value


ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}


def check_messages(msgs: Any, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"column '{key}' must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"column '{key}' message {i} must have 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise RowError(
                f"column '{key}' message {i} has role {m['role']!r}; use system, user or assistant"
            )
        if not isinstance(m["content"], str):
            raise RowError(f"column '{key}' message {i}: content must be a string")
        if m["role"] in ("user", "assistant") and not m["content"].strip():
            raise RowError(f"column '{key}' message {i} ({m['role']}) is empty")
    return msgs


# --------------------------------------------------------------------------------------
# Converters, one per input format


def _sft_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completion": answer(row, "output", opts)}


def _sft_prompt_completion(row, opts):
    return {"prompt": plain_prompt(row, opts), "completion": answer(row, "completion", opts)}


def _sft_messages(row, opts):
    msgs = check_messages(row.get("messages"), "messages")
    if msgs[-1]["role"] != "assistant":
        raise RowError("column 'messages' must end with an assistant message")
    if opts.system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": opts.system}, *msgs]
    return {"messages": msgs}


def _sft_sharegpt(row, opts):
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RowError("column 'conversations' must be a non-empty list of {from, value} turns")
    msgs = []
    for i, turn in enumerate(conv):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLE_MAP
            or not isinstance(turn.get("value"), str)
        ):
            raise RowError(
                f"column 'conversations' turn {i} must be {{'from': human|gpt|system, 'value': text}}"
            )
        msgs.append({"role": ROLE_MAP[turn["from"]], "content": turn["value"]})
    if row.get("system"):
        msgs.insert(0, {"role": "system", "content": text(row, "system")})
    return _sft_messages({"messages": msgs}, opts)


def _margin(row, out):
    if row.get("margin") is not None:
        out["margin"] = number(row, "margin")
    return out


def _check_distinct(out, a="chosen", b="rejected"):
    if out[a] == out[b]:
        raise RowError(f"'{a}' and '{b}' are identical")
    return out


def _pref_alpaca(row, opts):
    out = {
        "prompt": alpaca_prompt(row, opts),
        "chosen": answer(row, "chosen", opts),
        "rejected": answer(row, "rejected", opts),
    }
    return _margin(row, _check_distinct(out))


def _pref_trl(row, opts):
    out = {
        "prompt": plain_prompt(row, opts),
        "chosen": answer(row, "chosen", opts),
        "rejected": answer(row, "rejected", opts),
    }
    return _margin(row, _check_distinct(out))


def _kto_alpaca(row, opts):
    return {
        "prompt": alpaca_prompt(row, opts),
        "completion": answer(row, "output", opts),
        "label": boolean(row, "kto_tag"),
    }


def _kto_trl(row, opts):
    return {
        "prompt": plain_prompt(row, opts),
        "completion": answer(row, "completion", opts),
        "label": boolean(row, "label"),
    }


def _point_trl(row, opts):
    return {
        "prompt": plain_prompt(row, opts),
        "completion": answer(row, "completion", opts),
        "score": number(row, "score"),
    }


def _point_alpaca(row, opts):
    return {
        "prompt": alpaca_prompt(row, opts),
        "completion": answer(row, "output", opts),
        "score": number(row, "score"),
    }


def _ranking(row: Row, n: int) -> list[int]:
    """The `ranking` column: ranking[i] is the rank of response i, 0 = best, each rank once."""
    ranking = row.get("ranking")
    # bool is a subclass of int: [true, false] must not pass for [1, 0].
    if not isinstance(ranking, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranking
    ):
        raise RowError(
            f"column 'ranking' must be a list of integer ranks (0 = best), got {type(ranking).__name__} "
            f"{ranking!r:.60}"
        )
    if sorted(ranking) != list(range(n)):
        hint = " (ranks are 0-based: subtract 1)" if sorted(ranking) == list(range(1, n + 1)) else ""
        raise RowError(
            f"column 'ranking' must be a permutation of 0..{n - 1} (one rank per response, 0 = best), "
            f"got {ranking!r:.60}{hint}"
        )
    return ranking


def _ranked(row, key, opts):
    responses = string_list(row, key, 2)
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if response in seen:
            raise RowError(f"column '{key}': responses {seen[response]} and {i} are identical")
        seen[response] = i
    if row.get("ranking") is not None:
        # TRL-style: `ranking[i]` is the rank of completions[i] (0 = best); reorder best first.
        ranking = _ranking(row, len(responses))
        responses = [r for _, r in sorted(zip(ranking, responses, strict=True))]
    if opts.conversational:
        return [[{"role": "assistant", "content": r}] for r in responses]
    return responses


def _list_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completions": _ranked(row, "responses", opts)}


def _list_trl(row, opts):
    return {"prompt": plain_prompt(row, opts), "completions": _ranked(row, "completions", opts)}


def _prompt_alpaca(row, opts):
    extra = {k: v for k, v in row.items() if k not in ("instruction", "input", "system", "history")}
    return {**extra, "prompt": alpaca_prompt(row, opts)}


def _prompt_trl(row, opts):
    return {**row, "prompt": plain_prompt(row, opts)}


# Order matters: the first input format whose required columns are all present wins, so the
# more specific layouts come first.
INPUT_FORMATS: list[InputFormat] = [
    InputFormat("alpaca", "sft", ("instruction", "output"), ("input", "system", "history"), _sft_alpaca),
    InputFormat("messages", "sft", ("messages",), (), _sft_messages),
    InputFormat("sharegpt", "sft", ("conversations",), ("system",), _sft_sharegpt),
    InputFormat("prompt_completion", "sft", ("prompt", "completion"), (), _sft_prompt_completion),
    InputFormat(
        "alpaca_preference",
        "preference",
        ("instruction", "chosen", "rejected"),
        ("input", "system", "history", "margin"),
        _pref_alpaca,
    ),
    InputFormat("preference", "preference", ("prompt", "chosen", "rejected"), ("margin",), _pref_trl),
    InputFormat(
        "alpaca_kto", "kto", ("instruction", "output", "kto_tag"), ("input", "system", "history"), _kto_alpaca
    ),
    InputFormat("kto", "kto", ("prompt", "completion", "label"), (), _kto_trl),
    InputFormat(
        "alpaca_pointwise",
        "pointwise",
        ("instruction", "output", "score"),
        ("input", "system", "history"),
        _point_alpaca,
    ),
    InputFormat("pointwise", "pointwise", ("prompt", "completion", "score"), (), _point_trl),
    InputFormat(
        "alpaca_listwise",
        "listwise",
        ("instruction", "responses"),
        ("input", "system", "history"),
        _list_alpaca,
    ),
    InputFormat("listwise", "listwise", ("prompt", "completions"), ("ranking",), _list_trl),
    InputFormat(
        "alpaca_prompt",
        "prompt",
        ("instruction",),
        ("input", "system", "history"),
        _prompt_alpaca,
        keeps_extra=True,
    ),
    InputFormat("prompt", "prompt", ("prompt",), (), _prompt_trl, keeps_extra=True),
]
BY_NAME = {f.name: f for f in INPUT_FORMATS}
STANDARD_FORMATS = sorted({f.standard for f in INPUT_FORMATS})


# Column names that suggest a ranking under another name.
RANKING_LIKE = ("rank", "order")


def check_ranking_column(fmt: InputFormat, columns: set[str], source: str) -> None:
    """Raises AlignError when listwise data has no `ranking` but a column that looks like one.

    Without `ranking` the responses are taken as best first; a ranking under another name
    (`rankings`, `rank`, `order`) would be ignored and the model trained on the wrong order.
    """
    if fmt.standard != "listwise" or "ranking" in columns:
        return
    lookalikes = sorted(c for c in columns if any(word in c.lower() for word in RANKING_LIKE))
    if lookalikes:
        col = lookalikes[0]
        listed = "responses" if "responses" in fmt.required else "completions"
        raise AlignError(
            f"{source}: column '{col}' looks like a ranking, but listwise data reads its ranking from "
            f"'ranking' (without one, '{listed}' are taken as best first): set data.columns.ranking={col}, "
            "or drop or rename the column if it is not a ranking"
        )


def known_columns(standard: str) -> list[str]:
    """Every column some input format of `standard` reads (the names `data.columns.<ours>` may take)."""
    names = {c for f in INPUT_FORMATS if f.standard == standard for c in (*f.required, *f.optional)}
    if standard == "listwise":
        names.add("ranking")  # read by both listwise layouts (see `_ranked`)
    return sorted(names)


def keeps_extra(standard: str) -> bool:
    """Whether `standard` data passes every other column on (to reward functions, which may read any)."""
    return any(f.keeps_extra for f in INPUT_FORMATS if f.standard == standard)


def describe_columns(columns, renamed: dict[str, str] | None = None, sort: bool = True) -> str:
    """The columns as the file names them, for messages (sorted, or in the order given):
    `question (as prompt)` for a column that `data.columns.prompt=question` renamed."""
    renamed = renamed or {}
    names = [f"{renamed[c]} (as {c})" if c in renamed else c for c in columns]
    return ", ".join(sorted(names) if sort else names)


def detect(
    standard: str, columns: set[str], requested: str, source: str, renamed: dict[str, str] | None = None
) -> InputFormat:
    """Picks the input format for a method's standard format.

    Args:
        standard: the method's standard format.
        columns: the dataset's columns, after `data.columns` renamed some.
        requested: `data.format` (`auto` or an input format's name).
        source: the dataset, for messages.
        renamed: our name -> the file's name, for the columns `data.columns` renamed (messages
            list the file's own names).

    Raises:
        AlignError: the requested format is unknown or for another method, or no input
            format matches the columns (names the columns found and what would be valid).
    """
    if standard not in STANDARD_FORMATS:
        raise AlignError(f"method format '{standard}' is not one of: {', '.join(STANDARD_FORMATS)}")
    candidates = [f for f in INPUT_FORMATS if f.standard == standard]
    if requested != "auto":
        fmt = BY_NAME.get(requested)
        if fmt is None:
            raise AlignError(
                f"data.format={requested} is unknown; formats for this method: "
                f"{', '.join(f.name for f in candidates)} (or auto)"
            )
        if fmt.standard != standard:
            raise AlignError(
                f"data.format={requested} holds {fmt.standard} data, but this method needs {standard} data: "
                f"use one of {', '.join(f.name for f in candidates)}"
            )
        missing = [c for c in fmt.required if c not in columns]
        if missing:
            raise AlignError(
                f"{source}: data.format={requested} needs column(s) {', '.join(missing)}; "
                f"columns found: {describe_columns(columns, renamed)} (rename with data.columns.<ours>=<yours>)"
            )
        check_ranking_column(fmt, columns, source)
        return fmt
    for fmt in candidates:
        if all(c in columns for c in fmt.required):
            check_ranking_column(fmt, columns, source)
            return fmt
    # Does the file match another method's data? Say so: it is the most common mistake.
    # The most specific match: alpaca_kto rather than alpaca for instruction/output/kto_tag.
    matches = [f for f in INPUT_FORMATS if all(c in columns for c in f.required)]
    other = max(matches, key=lambda f: len(f.required)) if matches else None
    hint = f"; these columns look like {other.standard} data ({other.name})" if other else ""
    wanted = " or ".join("[" + ", ".join(f.required) + "]" for f in candidates)
    raise AlignError(
        f"{source}: missing required column(s) for {standard} data: need {wanted}; "
        f"columns found: {describe_columns(columns, renamed) or 'none'}{hint}"
    )
