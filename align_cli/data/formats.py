"""Dataset formats: the seed's and TRL's input columns, converted to TRL's standard formats.

Each method takes one *standard* format (a method yaml's `format:`):

| standard     | columns produced                        | methods            |
|--------------|-----------------------------------------|--------------------|
| sft          | prompt, completion (or messages, text)  | sft                |
| preference   | prompt, chosen, rejected (+ margin)     | dpo, rm pairwise   |
| kto          | prompt, completion, label               | kto                |
| pointwise    | prompt, completion, score               | rm pointwise       |
| listwise     | prompt, completions (best first)        | rm listwise        |
| prompt       | prompt (+ every other column)           | ppo, grpo          |

and accepts several *input* formats (`data.format=<name>`, or detected from the columns).
With a chat template, prompts become conversations (lists of role/content messages) and
answers single assistant messages, which TRL renders with the template; without one they
stay plain text. A `tools` column travels as a JSON string (TRL passes it to the chat
template); messages keep `tool_calls`, `tool_call_id` and `name`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AlignError
from .messages import common_prefix, contents, looks_like_hh, normalize, parse_hh, sharegpt_turns, tools_json
from .problems import RowError

Row = dict[str, Any]


@dataclass(frozen=True)
class InputFormat:
    """One way a dataset can be laid out on disk."""

    name: str
    standard: str  # the standard format it converts to
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[Row, ConvertOptions], Row]
    keeps_extra: bool = False  # pass unknown columns through (prompt-only data for reward functions)


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


def _tools(row: Row, out: Row, key: str = "tools") -> Row:
    """Adds the row's tool schemas (a JSON string, as TRL passes them to the chat template)."""
    tools = tools_json(row.get(key), key) if key in row else None
    if tools is not None:
        out["tools"] = tools
    return out


# --------------------------------------------------------------------------------------
# Converters, one per input format


def _sft_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completion": answer(row, "output", opts)}


def _sft_prompt_completion(row, opts):
    return _tools(row, {"prompt": plain_prompt(row, opts), "completion": answer(row, "completion", opts)})


def _sft_text(row, opts):
    return {"text": text(row, "text")}


def _weighted_rows(msgs: list[dict], key: str) -> list[Row]:
    """One prompt/completion row per assistant turn to train on (weight 1, the default), its
    context the turns before it: TRL's completion-only loss then trains exactly those turns."""
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        if not any(p["role"] == "user" for p in msgs[:i]):
            raise RowError(
                f"column '{key}' message {i}: an assistant turn to train on needs a user turn before it"
            )
        clean = [{k: v for k, v in p.items() if k != "weight"} for p in msgs[: i + 1]]
        out.append({"prompt": clean[:i], "completion": [clean[i]]})
    if not out:
        raise RowError(f"column '{key}': every assistant message has weight 0, so nothing would be trained")
    return out


def _sft_conversation(msgs: list[dict], row: Row, opts: ConvertOptions, key: str):
    msgs = with_system(msgs, row, opts)
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"column '{key}' must end with an assistant message")
    if opts.weighted:
        if not opts.conversational:
            raise RowError("per-message 'weight' needs a chat template (the model has none)")
        return [_tools(row, r) for r in _weighted_rows(msgs, key)]
    return _tools(row, {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in msgs]})


def _sft_messages(row, opts):
    return _sft_conversation(
        normalize(row.get("messages"), "messages", opts.ignored, keep_weight=True), row, opts, "messages"
    )


def _sft_sharegpt(row, opts):
    return _sft_conversation(
        sharegpt_turns(row.get("conversations"), "conversations"), row, opts, "conversations"
    )


def _margin(row, out):
    if row.get("margin") is not None:
        out["margin"] = number(row, "margin")
    return out


def _check_distinct(out, a="chosen", b="rejected"):
    if out[a] == out[b]:
        raise RowError(f"'{a}' and '{b}' are identical")
    return out


def _pair(prompt, chosen, rejected, opts: ConvertOptions) -> Row:
    """A preference row from a conversational prompt and answers (flattened without a template)."""
    if not opts.conversational:
        prompt = contents(prompt) if isinstance(prompt, list) else prompt
        chosen, rejected = (
            "".join(m["content"] for m in x) if isinstance(x, list) else x for x in (chosen, rejected)
        )
    return _check_distinct({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def _pref_alpaca(row, opts):
    out = {
        "prompt": alpaca_prompt(row, opts),
        "chosen": answer(row, "chosen", opts),
        "rejected": answer(row, "rejected", opts),
    }
    return _margin(row, _check_distinct(out))


def _strip_shared(row: Row, opts: ConvertOptions) -> Row | None:
    """The H4 layout (UltraFeedback binarized): `chosen` and `rejected` are whole conversations
    that repeat the prompt's turns. Their shared leading turns become the prompt; None when the
    answers are plain answers (they start with the assistant)."""
    chosen, rejected = (row.get(k) for k in ("chosen", "rejected"))
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None
    # Counted apart: plain answers are normalised (and their ignored keys counted) again by `answer`.
    seen = Counter()
    chosen, rejected = normalize(chosen, "chosen", seen), normalize(rejected, "rejected", seen)
    if chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant":
        return None
    opts.ignored.update(seen)
    n = common_prefix(chosen, rejected)
    if n == 0 or not any(m["role"] == "user" for m in chosen[:n]):
        raise RowError(
            "'chosen' and 'rejected' are conversations that share no leading user turn: each must either "
            "start with the assistant's answer, or repeat the same prompt turns before its answer"
        )
    shared = chosen[:n]
    if "prompt" in row:
        prompt = row["prompt"]
        users = [m["content"] for m in shared if m["role"] == "user"]
        given = (
            [m["content"] for m in conversation(prompt, "prompt", opts) if m["role"] == "user"]
            if isinstance(prompt, list)
            else [text(row, "prompt")]
        )
        if users[-len(given) :] != given:
            raise RowError(
                "'chosen' and 'rejected' repeat leading turns that are not the 'prompt' column "
                f"(their last shared user turn: {users[-1]!r:.60})"
            )
    prompt = with_system(shared, row, opts)
    if not chosen[n:] or not rejected[n:]:
        raise RowError("'chosen' or 'rejected' has no answer after the turns they share")
    return _margin(row, _tools(row, _pair(prompt, chosen[n:], rejected[n:], opts)))


def _pref_trl(row, opts):
    shared = _strip_shared(row, opts)
    if shared is not None:
        return shared
    out = {
        "prompt": plain_prompt(row, opts),
        "chosen": answer(row, "chosen", opts),
        "rejected": answer(row, "rejected", opts),
    }
    return _margin(row, _tools(row, _check_distinct(out)))


def _string_prefix(a: str, b: str) -> int:
    """The shared leading text of two strings, backed off to a whitespace boundary (as TRL does)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and n < min(len(a), len(b)) and not a[n - 1].isspace():
        n -= 1
    return n


def _pref_implicit(row, opts):
    """`chosen`/`rejected` only: the prompt is their shared beginning (TRL's implicit prompt)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if looks_like_hh(chosen) and looks_like_hh(rejected) and opts.conversational:
        row = {**row, "chosen": parse_hh(chosen, "chosen"), "rejected": parse_hh(rejected, "rejected")}
    if isinstance(row["chosen"], list):
        out = _strip_shared(row, opts)
        if out is None:
            raise RowError(
                "'chosen' and 'rejected' start with the assistant: there is no prompt (add a 'prompt' column)"
            )
        return out
    chosen, rejected = text(row, "chosen"), text(row, "rejected")
    n = _string_prefix(chosen, rejected)
    if n == 0 or not chosen[:n].strip():
        raise RowError(
            "'chosen' and 'rejected' share no leading text, so there is no prompt: add a 'prompt' column"
        )
    if n == len(chosen) or n == len(rejected):
        raise RowError("one of 'chosen' and 'rejected' is the beginning of the other: no answer to compare")
    system = row_system(row)
    prompt = f"{system}\n{chosen[:n]}" if system else chosen[:n]
    return _margin(row, _check_distinct({"prompt": prompt, "chosen": chosen[n:], "rejected": rejected[n:]}))


def _pref_sharegpt(row, opts):
    """LLaMA-Factory's sharegpt preference: `conversations` up to the user's turn, `chosen` and
    `rejected` one {from, value} turn each."""
    prompt = with_system(sharegpt_turns(row.get("conversations"), "conversations"), row, opts)
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(
            "column 'conversations' must end with the user's turn (the answers are 'chosen' and 'rejected')"
        )
    answers = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        msgs = sharegpt_turns([value] if isinstance(value, dict) else value, key)
        if msgs[0]["role"] != "assistant":
            raise RowError(f"column '{key}' must be the assistant's turn (from: gpt)")
        answers.append(msgs)
    return _tools(row, _pair(prompt, answers[0], answers[1], opts))


def _pref_openai(row, opts):
    """OpenAI's preference fine-tuning rows: `input` {messages, tools}, `preferred_output`,
    `non_preferred_output` (each a list holding the assistant's message)."""
    given = row.get("input")
    if not isinstance(given, dict) or "messages" not in given:
        raise RowError("column 'input' must be an object with 'messages' (and optionally 'tools')")
    prompt = with_system(normalize(given["messages"], "input.messages", opts.ignored), row, opts)
    chosen = answer(row, "preferred_output", opts)
    rejected = answer(row, "non_preferred_output", opts)
    out = _pair(prompt, chosen, rejected, opts)
    return _tools(given, out) if "tools" in given else out


def _pref_labeled_pair(row, opts):
    """SHP-style pairs: two responses and `labels` saying which won (1: A, 0: B)."""
    key = "prompt" if "prompt" in row else "history"
    prompt = (
        plain_prompt({**row, "prompt": row.get(key)}, opts) if key == "history" else plain_prompt(row, opts)
    )
    label = row.get("labels")
    if isinstance(label, str) and label.strip() in ("0", "1"):
        label = int(label)
    if label not in (0, 1) or isinstance(label, float) and label not in (0.0, 1.0):
        raise RowError(
            f"column 'labels' must be 1 (human_ref_A won) or 0 (human_ref_B won), got {label!r:.40}"
        )
    a, b = answer(row, "human_ref_A", opts), answer(row, "human_ref_B", opts)
    chosen, rejected = (a, b) if int(label) == 1 else (b, a)
    return _check_distinct({"prompt": prompt, "chosen": chosen, "rejected": rejected})


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


def _kto_messages(row, opts):
    """LLaMA-Factory's KTO rows: `messages` ending with the answer, and a boolean `label`."""
    msgs = with_system(normalize(row.get("messages"), "messages", opts.ignored), row, opts)
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise RowError("column 'messages' must end with the assistant's answer, after the user's turn")
    prompt, completion = msgs[:-1], msgs[-1:]
    if not opts.conversational:
        prompt, completion = contents(prompt), completion[0]["content"]
    return _tools(row, {"prompt": prompt, "completion": completion, "label": boolean(row, "label")})


def _kto_sharegpt(row, opts):
    """sharegpt KTO rows (LLaMA-Factory's): `conversations` ending with the answer, a boolean `label`."""
    msgs = sharegpt_turns(row.get("conversations"), "conversations")
    return _kto_messages({**row, "messages": msgs}, opts)


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


def _ranking_from_scores(row: Row, key: str, n: int) -> list[int]:
    """Ranks (0 = best) from a `scores` column: higher is better.

    The listwise loss trains every pair of a row as (better, worse), so two equal scores have
    no order to learn: a tie is an error that says what to do, not an order picked at random.
    """
    values = row.get(key)
    if not isinstance(values, list) or len(values) != n:
        raise RowError(f"column '{key}' must be a list of {n} numbers, one per response, got {values!r:.60}")
    scores = [number({key: v}, key) for v in values]
    order = sorted(range(n), key=lambda i: -scores[i])
    for a, b in zip(order, order[1:], strict=False):
        if scores[a] == scores[b]:
            raise RowError(
                f"column '{key}': responses {min(a, b)} and {max(a, b)} tie at {scores[a]:g}; the listwise loss "
                "needs a strict order (it trains every pair as better/worse): break the tie, drop one "
                "response, or train on the scores with method.mode=pointwise"
            )
    ranks = [0] * n
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def _ranked(row, key, opts):
    value = row.get(key)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        raise RowError(
            f"column '{key}' holds objects, not response texts (UltraFeedback's raw layout): give "
            f"'{key}' as a list of strings and each one's score in 'scores' (higher is better)"
        )
    responses = string_list(row, key, 2)
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if response in seen:
            raise RowError(f"column '{key}': responses {seen[response]} and {i} are identical")
        seen[response] = i
    given = [k for k in SCORE_COLUMNS if row.get(k) is not None]
    if len(given) > 1:
        raise RowError(
            f"both '{given[0]}' and '{given[1]}' are given: keep the one that orders the responses"
        )
    score_key = given[0] if given else None
    if row.get("ranking") is not None and score_key:
        raise RowError(f"both 'ranking' and '{score_key}' are given: keep the one that orders the responses")
    if row.get("ranking") is not None or score_key:
        # TRL-style: `ranking[i]` is the rank of completions[i] (0 = best); reorder best first.
        ranking = (
            _ranking(row, len(responses))
            if score_key is None
            else _ranking_from_scores(row, score_key, len(responses))
        )
        responses = [r for _, r in sorted(zip(ranking, responses, strict=True))]
    if opts.conversational:
        return [[{"role": "assistant", "content": r}] for r in responses]
    return responses


def _pointwise_from_list(row, opts):
    """`completions` + `scores` rows for pointwise training: one row per (response, score)."""
    responses = string_list(row, "completions", 1)
    key = next((k for k in SCORE_COLUMNS if row.get(k) is not None), None)
    values = row.get(key) if key else None
    if not isinstance(values, list) or len(values) != len(responses):
        raise RowError(
            f"column '{key or 'scores'}' must be a list of {len(responses)} numbers, one per response"
        )
    prompt = plain_prompt(row, opts)
    return [
        {
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": r}] if opts.conversational else r,
            "score": number({key: v}, key),
        }
        for r, v in zip(responses, values, strict=True)
    ]


def _list_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completions": _ranked(row, "responses", opts)}


def _list_trl(row, opts):
    return {"prompt": plain_prompt(row, opts), "completions": _ranked(row, "completions", opts)}


def _prompt_alpaca(row, opts):
    extra = {k: v for k, v in row.items() if k not in ("instruction", "input", "system", "history")}
    return {**extra, "prompt": alpaca_prompt(row, opts)}


def _prompt_trl(row, opts):
    extra = {k: v for k, v in row.items() if k != "system"}
    return {**extra, "prompt": plain_prompt(row, opts)}


# Columns holding one score per listwise response, in the order they are looked for.
SCORE_COLUMNS = ("scores", "ratings")

# Order matters: the first input format whose required columns are all present wins, so the
# more specific layouts come first.
S, T = ("system",), ("system", "tools")
INPUT_FORMATS: list[InputFormat] = [
    InputFormat("alpaca", "sft", ("instruction", "output"), ("input", "system", "history"), _sft_alpaca),
    InputFormat("messages", "sft", ("messages",), T, _sft_messages),
    InputFormat("sharegpt", "sft", ("conversations",), T, _sft_sharegpt),
    InputFormat("prompt_completion", "sft", ("prompt", "completion"), T, _sft_prompt_completion),
    InputFormat("text", "sft", ("text",), (), _sft_text),
    InputFormat(
        "alpaca_preference",
        "preference",
        ("instruction", "chosen", "rejected"),
        ("input", "system", "history", "margin"),
        _pref_alpaca,
    ),
    InputFormat(
        "sharegpt_preference", "preference", ("conversations", "chosen", "rejected"), T, _pref_sharegpt
    ),
    InputFormat("preference", "preference", ("prompt", "chosen", "rejected"), ("margin", *T), _pref_trl),
    InputFormat(
        "openai_preference",
        "preference",
        ("input", "preferred_output", "non_preferred_output"),
        S,
        _pref_openai,
    ),
    InputFormat(
        "shp",
        "preference",
        ("human_ref_A", "human_ref_B", "labels"),
        ("prompt", "history", *S),
        _pref_labeled_pair,
    ),
    InputFormat("implicit_preference", "preference", ("chosen", "rejected"), ("margin", *T), _pref_implicit),
    InputFormat(
        "alpaca_kto", "kto", ("instruction", "output", "kto_tag"), ("input", "system", "history"), _kto_alpaca
    ),
    InputFormat("kto", "kto", ("prompt", "completion", "label"), S, _kto_trl),
    InputFormat("messages_kto", "kto", ("messages", "label"), T, _kto_messages),
    InputFormat("sharegpt_kto", "kto", ("conversations", "label"), T, _kto_sharegpt),
    InputFormat(
        "alpaca_pointwise",
        "pointwise",
        ("instruction", "output", "score"),
        ("input", "system", "history"),
        _point_alpaca,
    ),
    InputFormat("pointwise", "pointwise", ("prompt", "completion", "score"), S, _point_trl),
    InputFormat("pointwise_list", "pointwise", ("prompt", "completions", "scores"), S, _pointwise_from_list),
    InputFormat(
        "pointwise_ratings", "pointwise", ("prompt", "completions", "ratings"), S, _pointwise_from_list
    ),
    InputFormat(
        "alpaca_listwise",
        "listwise",
        ("instruction", "responses"),
        ("input", "system", "history", "ranking", *SCORE_COLUMNS),
        _list_alpaca,
    ),
    InputFormat(
        "listwise", "listwise", ("prompt", "completions"), ("ranking", *SCORE_COLUMNS, *S), _list_trl
    ),
    InputFormat(
        "alpaca_prompt",
        "prompt",
        ("instruction",),
        ("input", "system", "history"),
        _prompt_alpaca,
        keeps_extra=True,
    ),
    InputFormat("prompt", "prompt", ("prompt",), S, _prompt_trl, keeps_extra=True),
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
    return sorted({c for f in INPUT_FORMATS if f.standard == standard for c in (*f.required, *f.optional)})


# Columns that change what is learned when read: one that nothing reads is an error, not a
# warning (the run would train on something else than the file says).
MEANINGFUL = {
    "score": "a score per response",
    "scores": "a score per response",
    "rating": "a rating per response",
    "ratings": "a rating per response",
    "label": "a label",
    "labels": "labels",
    "weight": "weights",
    "weights": "weights",
    "system": "a system prompt",
    "system_prompt": "a system prompt",
    "tools": "tool schemas",
    "margin": "a margin",
    "ranking": "a ranking",
}


def unread_columns(fmt: InputFormat, columns: set[str], source: str) -> list[str]:
    """The columns that `fmt` does not read, as warnings; an AlignError for one that looks meaningful.

    Raises:
        AlignError: a column such as `labels`, `scores`, `weight`, `system` or `tools` that the
            layout ignores (names it, what it seems to hold, and the ways on).
    """
    if fmt.keeps_extra:  # passed on to reward functions, which may read any column
        return []
    read = {*fmt.required, *fmt.optional}
    unread = sorted(columns - read)
    for col in unread:
        if fmt.standard == "listwise" and col == "labels":
            raise AlignError(
                f"{source}: column 'labels' is not read by listwise data: rows of prompt, completions and "
                "labels look like TRL's stepwise supervision (one label per reasoning step), which no method "
                "here trains; a listwise ranking orders 'completions' with 'ranking' or 'scores'"
            )
        if col in MEANINGFUL:
            layouts = [
                f.name
                for f in INPUT_FORMATS
                if f.standard == fmt.standard and col in (*f.required, *f.optional)
            ]
            where = (
                f" (the {', '.join(layouts)} layout{'s' if len(layouts) > 1 else ''} of this method read it)"
                if layouts
                else ""
            )
            raise AlignError(
                f"{source}: column '{col}' ({MEANINGFUL[col]}) is not read by the {fmt.name} layout{where}: "
                f"rename the columns to such a layout (data.columns.<ours>=<yours>), or drop '{col}' "
                "if the run should not use it"
            )
    return [
        f"{source}: column '{col}' is not read by the {fmt.name} layout (not trained on)" for col in unread
    ]


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
            check_other_method(fmt, columns, source)
            return fmt
    # Does the file match another method's data? Say so: it is the most common mistake.
    # The most specific match: alpaca_kto rather than alpaca for instruction/output/kto_tag.
    # Not prompt data: any file with a prompt column "looks like" it.
    other = best_match(columns, exclude_standard=standard)
    hint = (
        f"; these columns look like {other.standard} data ({other.name}), which {METHODS_OF[other.standard]} takes"
        if other
        else ""
    )
    # The seed's and TRL's own layouts first; the community ones after the columns found.
    main = [f for f in candidates if f.name in (standard, f"alpaca_{standard}") or f.name == "alpaca"]
    more = [f for f in candidates if f not in main]
    wanted = " or ".join("[" + ", ".join(f.required) + "]" for f in main or candidates)
    also = (
        "; also accepted: " + ", ".join(f"{f.name} [{', '.join(f.required)}]" for f in more)
        if main and more
        else ""
    )
    raise AlignError(
        f"{source}: missing required column(s) for {standard} data: need {wanted}; "
        f"columns found: {describe_columns(columns, renamed) or 'none'}{hint}{also}"
    )


METHODS_OF = {
    "sft": "method=sft",
    "preference": "method=dpo or method=rm (pairwise)",
    "kto": "method=kto",
    "pointwise": "method=rm method.mode=pointwise",
    "listwise": "method=rm method.mode=listwise",
    "prompt": "method=ppo or method=grpo",
}


def best_match(columns: set[str], exclude_standard: str | None = None) -> InputFormat | None:
    """The most specific input format (most required columns) whose columns the file has."""
    matches = [
        f
        for f in INPUT_FORMATS
        if not f.keeps_extra and f.standard != exclude_standard and all(c in columns for c in f.required)
    ]
    return max(matches, key=lambda f: len(f.required)) if matches else None


def check_other_method(fmt: InputFormat, columns: set[str], source: str) -> None:
    """Raises AlignError when the columns fit another method's layout more closely than `fmt`
    (a preference file read as SFT conversations would leave chosen/rejected unread).

    Prompt data (PPO, GRPO) is exempt: it keeps every column for the rewards.
    """
    if fmt.keeps_extra:
        return
    other = best_match(columns, exclude_standard=fmt.standard)
    read = {*fmt.required, *fmt.optional}
    unread = [c for c in other.required if c not in read] if other is not None else []
    if other is not None and set(fmt.required) < set(other.required) and unread:
        extra = ", ".join(unread)
        raise AlignError(
            f"{source}: these columns look like {other.standard} data ({other.name}: "
            f"{', '.join(other.required)}), which {METHODS_OF[other.standard]} takes; read as "
            f"{fmt.standard} data ({fmt.name}), {extra} would not be used: use that method, or set "
            f"data.format={fmt.name} and drop {extra}"
        )
