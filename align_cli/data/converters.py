"""One converter per input format (see `formats.INPUT_FORMATS`): a row in that layout to the
method's standard format, or a `RowError` naming what is wrong with it.
"""

from __future__ import annotations

from collections import Counter

from .fields import (
    ConvertOptions,
    Row,
    alpaca_prompt,
    answer,
    boolean,
    conversation,
    number,
    plain_prompt,
    row_system,
    string_list,
    text,
    with_system,
    with_tools,
)
from .messages import common_prefix, contents, looks_like_hh, normalize, parse_hh, sharegpt_turns
from .problems import RowError


def sft_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completion": answer(row, "output", opts)}


def sft_prompt_completion(row, opts):
    return with_tools(row, {"prompt": plain_prompt(row, opts), "completion": answer(row, "completion", opts)})


def sft_text(row, opts):
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
        return [with_tools(row, r) for r in _weighted_rows(msgs, key)]
    return with_tools(row, {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in msgs]})


def sft_messages(row, opts):
    return _sft_conversation(
        normalize(row.get("messages"), "messages", opts.ignored, keep_weight=True), row, opts, "messages"
    )


def sft_sharegpt(row, opts):
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


def pref_alpaca(row, opts):
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
    return _margin(row, with_tools(row, _pair(prompt, chosen[n:], rejected[n:], opts)))


def pref_trl(row, opts):
    shared = _strip_shared(row, opts)
    if shared is not None:
        return shared
    out = {
        "prompt": plain_prompt(row, opts),
        "chosen": answer(row, "chosen", opts),
        "rejected": answer(row, "rejected", opts),
    }
    return _margin(row, with_tools(row, _check_distinct(out)))


def _string_prefix(a: str, b: str) -> int:
    """The shared leading text of two strings, backed off to a whitespace boundary (as TRL does)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and n < min(len(a), len(b)) and not a[n - 1].isspace():
        n -= 1
    return n


def pref_implicit(row, opts):
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


def pref_sharegpt(row, opts):
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
    return with_tools(row, _pair(prompt, answers[0], answers[1], opts))


def pref_openai(row, opts):
    """OpenAI's preference fine-tuning rows: `input` {messages, tools}, `preferred_output`,
    `non_preferred_output` (each a list holding the assistant's message)."""
    given = row.get("input")
    if not isinstance(given, dict) or "messages" not in given:
        raise RowError("column 'input' must be an object with 'messages' (and optionally 'tools')")
    prompt = with_system(normalize(given["messages"], "input.messages", opts.ignored), row, opts)
    chosen = answer(row, "preferred_output", opts)
    rejected = answer(row, "non_preferred_output", opts)
    out = _pair(prompt, chosen, rejected, opts)
    return with_tools(given, out) if "tools" in given else out


def pref_labeled_pair(row, opts):
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


def kto_alpaca(row, opts):
    return {
        "prompt": alpaca_prompt(row, opts),
        "completion": answer(row, "output", opts),
        "label": boolean(row, "kto_tag"),
    }


def kto_trl(row, opts):
    return {
        "prompt": plain_prompt(row, opts),
        "completion": answer(row, "completion", opts),
        "label": boolean(row, "label"),
    }


def kto_messages(row, opts):
    """LLaMA-Factory's KTO rows: `messages` ending with the answer, and a boolean `label`."""
    msgs = with_system(normalize(row.get("messages"), "messages", opts.ignored), row, opts)
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise RowError("column 'messages' must end with the assistant's answer, after the user's turn")
    prompt, completion = msgs[:-1], msgs[-1:]
    if not opts.conversational:
        prompt, completion = contents(prompt), completion[0]["content"]
    return with_tools(row, {"prompt": prompt, "completion": completion, "label": boolean(row, "label")})


def kto_sharegpt(row, opts):
    """sharegpt KTO rows (LLaMA-Factory's): `conversations` ending with the answer, a boolean `label`."""
    msgs = sharegpt_turns(row.get("conversations"), "conversations")
    return kto_messages({**row, "messages": msgs}, opts)


def point_trl(row, opts):
    return {
        "prompt": plain_prompt(row, opts),
        "completion": answer(row, "completion", opts),
        "score": number(row, "score"),
    }


def point_alpaca(row, opts):
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


def pointwise_from_list(row, opts):
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


def list_alpaca(row, opts):
    return {"prompt": alpaca_prompt(row, opts), "completions": _ranked(row, "responses", opts)}


def list_trl(row, opts):
    return {"prompt": plain_prompt(row, opts), "completions": _ranked(row, "completions", opts)}


def prompt_alpaca(row, opts):
    extra = {k: v for k, v in row.items() if k not in ("instruction", "input", "system", "history")}
    return {**extra, "prompt": alpaca_prompt(row, opts)}


def prompt_trl(row, opts):
    extra = {k: v for k, v in row.items() if k != "system"}
    return {**extra, "prompt": plain_prompt(row, opts)}


# Columns holding one score per listwise response, in the order they are looked for.
SCORE_COLUMNS = ("scores", "ratings")
