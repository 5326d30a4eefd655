"""Rows against the tokenizer: prompts that leave room for the answer (refused, dropped or cut
to fit per `data.too_long`) and tool calls the chat template renders.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ..config import DataConfig
from ..errors import AlignError
from .convert import Loaded
from .lengths import measure, too_long

log = logging.getLogger("align")


@dataclass
class PromptRoom:
    """How many tokens a prompt may have, and why (for the message when one has more)."""

    limit: int
    why: str

    @classmethod
    def for_answer(cls, max_length: int) -> PromptRoom:
        return cls(max_length - 1, f"model.max_length={max_length} leaves no room for the answer")


def long_prompts_problem(loaded: Loaded, prompt_lengths: list[int], room: PromptRoom) -> str | None:
    """The message for prompts longer than `room.limit` tokens, or None."""
    long = too_long(prompt_lengths, room.limit)
    if not long:
        return None
    first = long[0]
    return (
        f"{len(long)} of {len(prompt_lengths)} prompts are longer than {room.limit} tokens ({room.why}); "
        f"first: {loaded.origins[first]} ({prompt_lengths[first]} tokens): "
        "raise model.max_length, shorten these prompts, or set data.too_long=drop (leave those rows out) "
        "or data.too_long=truncate (cut them to fit)"
    )


def check_prompt_lengths(
    loaded: Loaded, standard: str, tokenizer, room: PromptRoom, mode: str = "refuse"
) -> str | None:
    """Prompts longer than `room` allows: refused (count and first row), or, with `data.too_long`,
    left out (`drop`) or cut to fit (`truncate`) in place.

    Returns:
        What was done, for the log (None when every prompt fits).

    Raises:
        AlignError: some prompt is too long and `mode` is refuse, or truncating cannot make it fit.
    """
    lengths = measure(loaded.rows, standard, tokenizer, prompts_only=True)
    message = long_prompts_problem(loaded, lengths.prompt, room)
    if not message:
        return None
    if mode == "refuse":
        raise AlignError(message)
    long = too_long(lengths.prompt, room.limit)
    if mode == "drop":
        if len(long) == len(loaded.rows):
            raise AlignError(f"data.too_long=drop would leave no row: {message}")
        skip, first = set(long), loaded.origins[long[0]]
        loaded.rows = [r for i, r in enumerate(loaded.rows) if i not in skip]
        loaded.origins = [o for i, o in enumerate(loaded.origins) if i not in skip]
        return (
            f"data.too_long=drop: left out {len(long)} of {len(lengths.prompt)} rows whose prompt is longer "
            f"than {room.limit} tokens (first: {first})"
        )
    for i in long:
        loaded.rows[i] = truncate_row(loaded.rows[i], standard, tokenizer, room.limit, loaded.origins[i])
    return (
        f"data.too_long=truncate: cut {len(long)} of {len(lengths.prompt)} prompts to {room.limit} tokens "
        "(earliest turns first, then the end of the last user turn)"
    )


def truncate_row(row: dict, standard: str, tokenizer, limit: int, origin: str) -> dict:
    """The row with its prompt cut to `limit` tokens as rendered: the oldest turns of a
    conversation go first (its system message stays), then the end of the last user turn
    (or of a text prompt), which keeps an instruction's opening words.

    Raises:
        AlignError: the prompt cannot fit even when cut (e.g. a system prompt alone is longer).
    """
    from .lengths import measure as _measure

    def fits(prompt) -> int:
        probe = (
            {**row, "messages": [*prompt, row["messages"][-1]]}
            if "messages" in row
            else {**row, "prompt": prompt}
        )
        return _measure([probe], standard, tokenizer, prompts_only=True).prompt[0]

    prompt = row["messages"][:-1] if "messages" in row else row["prompt"]
    if isinstance(prompt, list):
        prompt = [dict(m) for m in prompt]
        head = 1 if prompt and prompt[0]["role"] == "system" else 0
        # Drop the oldest turns (user and the answer after it) while more than one user turn is left.
        while fits(prompt) > limit and sum(m["role"] == "user" for m in prompt[head:]) > 1:
            del prompt[head]
            while len(prompt) > head + 1 and prompt[head]["role"] != "user":
                del prompt[head]
    for _ in range(8):  # each pass cuts the excess (token counts of a cut text shift a little)
        excess = fits(prompt) - limit
        if excess <= 0:
            break
        last = prompt[-1] if isinstance(prompt, list) else None
        content = last["content"] if last is not None else prompt
        ids = tokenizer(content, add_special_tokens=False)["input_ids"]
        if excess >= len(ids):
            raise AlignError(f"{origin}: data.too_long=truncate cannot fit this prompt in {limit} tokens")
        cut = tokenizer.decode(ids[: len(ids) - excess])
        if last is not None:
            last["content"] = cut
        else:
            prompt = cut
    else:
        raise AlignError(f"{origin}: data.too_long=truncate cannot fit this prompt in {limit} tokens")
    if "messages" in row:
        return {**row, "messages": [*prompt, row["messages"][-1]]}
    return {**row, "prompt": prompt}


def check_tool_rendering(loaded: Loaded, tokenizer, model_name: str = "") -> None:
    """Refuses tool calls or tool schemas that the chat template does not render: the rows would
    train on empty assistant turns or without the tools they call.

    Raises:
        AlignError: naming the first such row and the way on (a template that renders tools).
    """
    for row, origin in zip(loaded.rows, loaded.origins, strict=True):
        msgs = row.get("messages") or [
            *(row.get("prompt") if isinstance(row.get("prompt"), list) else []),
            *(row.get("completion") or row.get("chosen") or []),
        ]
        calls = [c for m in msgs if isinstance(m, dict) for c in m.get("tool_calls") or []]
        tools = json.loads(row["tools"]) if row.get("tools") else []
        if not calls and not tools:
            continue

        # A template renders them when taking them away changes the text.
        def render(messages, schemas):
            try:
                return tokenizer.apply_chat_template(messages, tools=schemas or None, tokenize=False)
            except Exception as err:  # a template that cannot take these messages at all
                return f"<error {type(err).__name__}: {err}>"

        full = render(msgs, tools)
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in msgs]
        missing = None
        if full.startswith("<error"):
            missing = ("tool calls", full)
        elif calls and render(bare, tools) == full:
            missing = ("tool calls", calls[0]["function"]["name"])
        elif tools and render(msgs, None) == full:
            missing = ("tool schemas ('tools')", tools[0]["function"]["name"])
        if missing:
            what, name = missing
            raise AlignError(
                f"{origin}: the chat template{f' of {model_name}' if model_name else ''} does not render {what} "
                f"({name!r:.80} leaves the text unchanged), so these rows would train without them: set "
                "model.chat_template=<file> to a template that renders tools, or use a model whose template does"
            )
        return  # one row shows whether the template renders them


def fit_rows(loaded: Loaded, standard: str, tokenizer, room: PromptRoom | None, data_cfg: DataConfig) -> None:
    """Every check of one split against the tokenizer (none without one): tool rendering, prompt room."""
    if tokenizer is None:
        return
    if tokenizer.chat_template is not None:
        check_tool_rendering(loaded, tokenizer)
    if room is not None:
        note = check_prompt_lengths(loaded, standard, tokenizer, room, data_cfg.too_long)
        if note:
            log.warning("%s", note)
            loaded.warnings.append(note)
