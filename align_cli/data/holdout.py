"""Where evaluation rows come from: a separate source, kept apart from training's files, or
training rows held out whole prompts at a time (`data.eval_ratio`).
"""

from __future__ import annotations

import json
import logging
import random

from ..config import DataConfig
from ..errors import AlignError
from .convert import Loaded

log = logging.getLogger("align")


def has_eval_source(data_cfg: DataConfig) -> bool:
    """Whether evaluation reads its own rows (`data.eval_path` or `data.eval_split`), not held-out ones."""
    return bool(data_cfg.eval_path or data_cfg.eval_split)


def check_disjoint(train: Loaded, evaluation: Loaded, data_cfg: DataConfig) -> None:
    """Raises AlignError when the evaluation split reads a file (or hub split) that training reads."""
    trained = set(train.files)
    shared = [f for f in evaluation.files if f in trained]
    if shared:
        key = (
            f"data.eval_path={data_cfg.eval_path}"
            if data_cfg.eval_path
            else f"data.eval_split={data_cfg.eval_split}"
        )
        raise AlignError(
            f"{key}: evaluation would read {shared[0].removeprefix('hub:')}, which training reads too "
            "(scores on training rows say nothing about new data): point data.eval_path at other rows, "
            "or use data.eval_ratio to hold rows out"
        )


def prompt_key(row: dict) -> str | None:
    """What the rows about one prompt share: the prompt, or a conversation's turns before its
    answer (SFT `messages`); None when a row has neither."""
    if "prompt" in row:
        value = row["prompt"]
    elif isinstance(row.get("messages"), list):
        value = row["messages"][:-1]
    else:
        return None
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def held_out(rows: list[dict], ratio: float, seed: int, origins: list[str] | None = None) -> list[int]:
    """The indices (in order) of the rows held out for evaluation, whole prompts at a time.

    Prompts are visited in an order shuffled with `seed`; each is held out when that brings
    the held-out count closer to `round(len(rows) * ratio)` and leaves rows for training. With
    one row per prompt this is exactly that many rows (the rows a plain row shuffle picks);
    with several, a prompt whose rows would overshoot the target more than fill it stays in
    training.

    Raises:
        AlignError: `ratio` is not in [0, 1).
    """
    if not 0 <= ratio < 1:
        raise AlignError(f"data.eval_ratio={ratio} must be in [0, 1)")
    target = int(round(len(rows) * ratio))
    if target == 0:
        return []
    # Rows go together when they share a prompt, or (with `origins`) come from one line of the
    # file (a conversation trained turn by turn: a later turn's prompt holds the earlier ones).
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    for i, row in enumerate(rows):
        key = prompt_key(row)
        for k in ([("prompt", key)] if key is not None else []) + (
            [("origin", origins[i])] if origins else []
        ):
            if k in first:
                parent[root(i)] = root(first[k])
            else:
                first[k] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(root(i), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for group in order:
        size = len(held) + len(group)
        if abs(size - target) < abs(len(held) - target) and size < len(rows):
            held += group
    if not held:
        log.warning(
            "data.eval_ratio=%s holds out nothing: held-out rows go by prompt (no prompt in both splits), "
            "and no prompt's rows fit in %d rows; raise data.eval_ratio or set data.eval_path",
            ratio,
            target,
        )
    return sorted(held)
