"""Dataset formats: the seed's and TRL's input columns, converted to TRL's standard formats.

Each method takes one *standard* format, its dataset type (`method.dataset_type`, TRL's term):

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

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AlignError
from .converters import (
    SCORE_COLUMNS,
    kto_alpaca,
    kto_messages,
    kto_sharegpt,
    kto_trl,
    list_alpaca,
    list_trl,
    point_alpaca,
    point_trl,
    pointwise_from_list,
    pref_alpaca,
    pref_implicit,
    pref_labeled_pair,
    pref_openai,
    pref_sharegpt,
    pref_trl,
    prompt_alpaca,
    prompt_trl,
    sft_alpaca,
    sft_messages,
    sft_prompt_completion,
    sft_sharegpt,
    sft_text,
)
from .fields import ConvertOptions, Row


@dataclass(frozen=True)
class InputFormat:
    """One way a dataset can be laid out on disk."""

    name: str
    standard: str  # the standard format it converts to
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[Row, ConvertOptions], Row]
    keeps_extra: bool = False  # pass unknown columns through (prompt-only data for reward functions)


# --------------------------------------------------------------------------------------
# Field helpers


# --------------------------------------------------------------------------------------
# Prompts and answers


# --------------------------------------------------------------------------------------
# Converters, one per input format


# Order matters: the first input format whose required columns are all present wins, so the
# more specific layouts come first.
S, T = ("system",), ("system", "tools")
INPUT_FORMATS: list[InputFormat] = [
    InputFormat("alpaca", "sft", ("instruction", "output"), ("input", "system", "history"), sft_alpaca),
    InputFormat("messages", "sft", ("messages",), T, sft_messages),
    InputFormat("sharegpt", "sft", ("conversations",), T, sft_sharegpt),
    InputFormat("prompt_completion", "sft", ("prompt", "completion"), T, sft_prompt_completion),
    InputFormat("text", "sft", ("text",), (), sft_text),
    InputFormat(
        "alpaca_preference",
        "preference",
        ("instruction", "chosen", "rejected"),
        ("input", "system", "history", "margin"),
        pref_alpaca,
    ),
    InputFormat(
        "sharegpt_preference", "preference", ("conversations", "chosen", "rejected"), T, pref_sharegpt
    ),
    InputFormat("preference", "preference", ("prompt", "chosen", "rejected"), ("margin", *T), pref_trl),
    InputFormat(
        "openai_preference",
        "preference",
        ("input", "preferred_output", "non_preferred_output"),
        S,
        pref_openai,
    ),
    InputFormat(
        "shp",
        "preference",
        ("human_ref_A", "human_ref_B", "labels"),
        ("prompt", "history", *S),
        pref_labeled_pair,
    ),
    InputFormat("implicit_preference", "preference", ("chosen", "rejected"), ("margin", *T), pref_implicit),
    InputFormat(
        "alpaca_kto", "kto", ("instruction", "output", "kto_tag"), ("input", "system", "history"), kto_alpaca
    ),
    InputFormat("kto", "kto", ("prompt", "completion", "label"), S, kto_trl),
    InputFormat("messages_kto", "kto", ("messages", "label"), T, kto_messages),
    InputFormat("sharegpt_kto", "kto", ("conversations", "label"), T, kto_sharegpt),
    InputFormat(
        "alpaca_pointwise",
        "pointwise",
        ("instruction", "output", "score"),
        ("input", "system", "history"),
        point_alpaca,
    ),
    InputFormat("pointwise", "pointwise", ("prompt", "completion", "score"), S, point_trl),
    InputFormat("pointwise_list", "pointwise", ("prompt", "completions", "scores"), S, pointwise_from_list),
    InputFormat(
        "pointwise_ratings", "pointwise", ("prompt", "completions", "ratings"), S, pointwise_from_list
    ),
    InputFormat(
        "alpaca_listwise",
        "listwise",
        ("instruction", "responses"),
        ("input", "system", "history", "ranking", *SCORE_COLUMNS),
        list_alpaca,
    ),
    InputFormat("listwise", "listwise", ("prompt", "completions"), ("ranking", *SCORE_COLUMNS, *S), list_trl),
    InputFormat(
        "alpaca_prompt",
        "prompt",
        ("instruction",),
        ("input", "system", "history"),
        prompt_alpaca,
        keeps_extra=True,
    ),
    InputFormat("prompt", "prompt", ("prompt",), S, prompt_trl, keeps_extra=True),
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
