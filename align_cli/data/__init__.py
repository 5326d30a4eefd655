"""The data layer: read a dataset, pick its input format, convert it, split off evaluation.

from align_cli.data import load_datasets
train, evaluation = load_datasets(cfg.data, "preference", conversational=True, seed=42)

The evaluation rows come from one of, in this order:
- `data.eval_path`: a separate file, folder or hub id (its `data.eval_split` when it has splits);
- `data.eval_split`: another split of `data.path` (a hub dataset's, or the files named for it in
  a folder: `train.jsonl` / `test.jsonl`);
- `data.eval_ratio`: rows held out of the training split, whole prompts at a time, so that no
  prompt is in both splits (several responses to one prompt are common in preference and
  reward data; splitting them by row would evaluate on prompts the model trained on).
Evaluation never reads a file that training reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import SAMPLES_DIR, DataConfig
from ..errors import AlignError, nearest, one_line
from .formats import (
    ConvertOptions,
    InputFormat,
    RowError,
    describe_columns,
    detect,
    keeps_extra,
    known_columns,
    unread_columns,
)
from .lengths import measure, too_long
from .problems import Problems
from .readers import Rows, read_any
from .sources import from_registry, is_registry, registry_rows, sources, take

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("align")


@dataclass
class Loaded:
    """Converted rows and what was detected about them.

    `origins[i]` is where `rows[i]` came from; rows that could not be converted are left out
    (and reported as problems). `input_format` is None when no row could be read at all.
    """

    rows: list[dict]
    origins: list[str]
    input_format: InputFormat | None
    source: str
    columns: list[str] = field(default_factory=list)
    rows_read: int = 0
    files: list[str] = field(default_factory=list)  # what was read (see readers.Rows.files)
    warnings: list[str] = field(default_factory=list)  # columns and keys nothing read, said once each
    formats: list[str] = field(default_factory=list)  # each source's input format, when several were read


def data_path(data_cfg: DataConfig, sample: str | None):
    """The configured path (a string or a list, see sources.py), or the method's sample file when
    `data.path` is null."""
    if data_cfg.path:
        return data_cfg.path
    if not sample:
        raise AlignError("data.path is not set and this method has no sample dataset: set data.path=<file>")
    return str(SAMPLES_DIR / sample)


def check_column_names(mapping: dict[str, str], standard: str) -> None:
    """Checks the <ours> side of `data.columns.<ours>=<yours>`: a column the method's data reads.

    Data that passes its other columns on to reward functions (PPO, GRPO) may name any column.

    Raises:
        AlignError: naming the key, the nearest valid name and the valid ones.
    """
    if keeps_extra(standard):
        return
    valid = known_columns(standard)
    for ours, theirs in mapping.items():
        if ours not in valid:
            raise AlignError(
                f"data.columns.{ours}={theirs}: '{ours}' is not a column of {standard} data"
                f"{nearest(ours, valid)}; data.columns.<ours> takes one of {', '.join(valid)}"
            )


def rename_columns(raw: Rows, mapping: dict[str, str]) -> None:
    """Applies `data.columns` (our name -> the user's name) in place.

    A column of the file that already has one of our mapped names is left out: the mapping says
    where that column is read from. `raw.renamed` remembers the file's names, for messages.

    Raises:
        AlignError: a mapped column is not in the file (names the file and its columns), or
            two of our names map to one column.
    """
    if not mapping or not raw.rows:  # no rows: the reader's problems (or "empty") say why
        return
    present = set().union(*(r.keys() for r in raw.rows))
    for ours, theirs in mapping.items():
        if theirs not in present:
            raise AlignError(
                f"data.columns.{ours}={theirs}: {raw.source} has no column '{theirs}'"
                f"{nearest(theirs, present)}; its columns: {', '.join(sorted(present))}"
            )
    inverse: dict[str, str] = {}
    for ours, theirs in mapping.items():
        if theirs in inverse:
            raise AlignError(
                f"data.columns.{inverse[theirs]}={theirs} and data.columns.{ours}={theirs}: one column "
                "cannot be read as two; map each of our names to its own column"
            )
        inverse[theirs] = ours
    raw.rows = [
        {inverse.get(k, k): v for k, v in row.items() if k in inverse or k not in mapping} for row in raw.rows
    ]
    raw.renamed = dict(mapping)


# Checks one converted row beyond its format (e.g. against the rewards that read its columns):
# returns what is wrong with it, or None.
RowCheck = Callable[[dict], str | None]


def convert(
    raw: Rows,
    standard: str,
    requested: str,
    opts: ConvertOptions,
    problems: Problems | None = None,
    row_check: RowCheck | None = None,
) -> Loaded:
    """Converts every row to the standard format.

    Args:
        raw: the rows read, with their origins.
        standard: the method's standard format.
        requested: `data.format` (`auto` or an input format's name).
        opts: conversion options.
        problems: where bad rows are noted (conversion goes on); None raises after the last row.
        row_check: an extra check of each converted row (see `RowCheck`); a row it faults is
            a problem like a row that does not convert.

    Raises:
        AlignError: the dataset is empty or its columns fit no input format of `standard`.
        DataError: some rows are bad (only when `problems` is None): the first, and the count.
    """
    if not raw.rows:
        if problems:  # every row was unreadable: those problems say it better than "empty"
            return Loaded([], [], None, raw.source, files=raw.files)
        raise AlignError(f"{raw.source}: the dataset is empty")
    columns = set().union(*(r.keys() for r in raw.rows))
    fmt = detect(standard, columns, requested, raw.source, raw.renamed)
    warnings = unread_columns(fmt, columns, raw.source)
    # Per file: OpenAI's per-message `weight` anywhere makes every conversation of the file
    # train turn by turn (one layout for the whole dataset, as TRL needs).
    opts = dataclasses.replace(opts, weighted=standard == "sft" and _has_weights(raw.rows), ignored=Counter())
    found = problems if problems is not None else Problems()
    rows, origins = [], []
    for row, origin in zip(raw.rows, raw.origins, strict=True):
        missing = [c for c in fmt.required if c not in row]
        try:
            if missing:
                raise RowError(
                    f"missing column(s) {', '.join(missing)}; this row has: "
                    f"{describe_columns(row, raw.renamed, sort=False) or 'none'}"
                )
            converted = fmt.convert(row, opts)
        except RowError as err:
            found.add(f"{origin}: {err} ({fmt.name} format)")
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            # A shape no check anticipated (e.g. `history` that is not a list of pairs): still
            # a problem of this row, not a crash.
            found.add(f"{origin}: cannot read this row as {fmt.name} ({type(err).__name__}: {err})")
        else:
            for one in converted if isinstance(converted, list) else [converted]:
                problem = row_check(one) if row_check is not None else None
                if problem:
                    found.add(f"{origin}: {problem}")
                else:
                    rows.append(one)
                    origins.append(origin)
    mixed = mixed_type_rows(rows, origins)
    if mixed:
        for i in sorted(mixed):
            found.add(f"{origins[i]}: {mixed[i]}")
        rows = [r for i, r in enumerate(rows) if i not in mixed]
        origins = [o for i, o in enumerate(origins) if i not in mixed]
    if problems is None:
        found.raise_if_any(raw.source)
    if len(set(origins)) < len(origins):
        warnings.append(
            f"{raw.source}: {len(set(origins))} rows became {len(rows)} training rows ("
            + ("one per assistant turn with weight 1" if opts.weighted else "one per response and score")
            + ")"
        )
    warnings += [
        f"{raw.source}: message key '{name}' is not read ({count} message{'s' if count > 1 else ''})"
        for name, count in sorted(opts.ignored.items())
    ]
    for warning in warnings:
        log.warning("%s", warning)
    return Loaded(rows, origins, fmt, raw.source, sorted(columns), len(raw.rows), raw.files, warnings)


def _has_weights(rows: list[dict]) -> bool:
    """Whether some message of some row has OpenAI's per-message `weight`."""
    return any(
        isinstance(m, dict) and "weight" in m
        for row in rows
        for value in (row.get("messages"), row.get("conversations"))
        if isinstance(value, list)
        for m in value
    )


def _kind(value: object) -> str | None:
    """The type of a value as a column stores it (None: a missing value, which fits any)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"  # ints and floats share a column (as floats)
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def mixed_type_rows(rows: list[dict], origins: list[str]) -> dict[int, str]:
    """The converted rows whose value in some column has another type than in the column's other
    rows, with what is wrong (row index -> message).

    A dataset stores each column with one type (Arrow), so `"answer": 56` in one row and text in
    the others cannot be trained on (common in maths data, for a column passed to rewards).
    The type most rows have is taken as the column's (the first row's on a tie).
    """
    from collections import Counter

    kinds: dict[str, Counter] = {}
    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for column, value in row.items():
            kind = _kind(value)
            if kind is not None:
                kinds.setdefault(column, Counter())[kind] += 1
                first.setdefault((column, kind), i)
    out: dict[int, str] = {}
    for column, counts in kinds.items():
        if len(counts) < 2:
            continue
        major = max(counts, key=lambda k: (counts[k], -first[(column, k)]))
        for i, row in enumerate(rows):
            kind = _kind(row.get(column))
            if kind is not None and kind != major and i not in out:
                shown = repr(row[column])
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                if major == "text" and kind in ("a number", "true/false"):
                    hint = f'write it as text too ("{row[column]}")'
                else:
                    hint = f"give '{column}' one type in every row"
                out[i] = (
                    f"column '{column}' is {kind} here ({shown}) but {major} in {counts[major]} other row"
                    f"{'s' if counts[major] != 1 else ''} (first: {origins[first[(column, major)]]}); a column "
                    f"holds one type: {hint}"
                )
    return out


def has_eval_source(data_cfg: DataConfig) -> bool:
    """Whether evaluation reads its own rows (`data.eval_path` or `data.eval_split`), not held-out ones."""
    return bool(data_cfg.eval_path or data_cfg.eval_split)


def read_and_convert(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    sample: str | None = None,
    evaluation: bool = False,
    problems: Problems | None = None,
    row_check: RowCheck | None = None,
) -> Loaded:
    """Reads and converts the training split, or the evaluation split; every bad row is
    collected before stopping. Several sources (`data.path=[a.jsonl,b.json]`) are read and
    converted one by one (each may have its own layout) and joined in order.

    Args:
        evaluation: read `data.eval_path` / `data.eval_split` instead of `data.path` / `data.split`.
        problems: where to collect bad rows and go on (`align data validate`); None raises a
            DataError naming the first bad row and the count once all rows were read.
        row_check: an extra check of each converted row (see `convert`).
    """
    found = problems if problems is not None else Problems()
    mapping = dict(data_cfg.columns)
    check_column_names(mapping, standard)
    if evaluation and data_cfg.eval_path:
        path, split, path_key = data_cfg.eval_path, data_cfg.eval_split, "data.eval_path"
    else:
        path, path_key = data_path(data_cfg, sample), "data.path"
        split = data_cfg.eval_split if evaluation else data_cfg.split
    parts = []
    budget = data_cfg.max_samples
    for source in sources(path, path_key):
        if is_registry(source.path):
            source = dataclasses.replace(
                from_registry(source.path, data_cfg.dataset), rows=source.rows, share=source.share
            )
        raw = read_any(
            source.path,
            source.subset or data_cfg.subset,
            source.split or split,
            found,
            key="data.eval_split" if evaluation else "data.split",
            split_names=(data_cfg.split, data_cfg.eval_split),
            path_key=path_key,
        )
        raw.rows, raw.origins = take(raw.rows, raw.origins, source)
        if source.formatting:
            raw.rows = registry_rows(raw.rows, source)
        rename_columns(raw, mapping)
        if budget is not None:
            raw.rows, raw.origins = raw.rows[:budget], raw.origins[:budget]
            budget -= len(raw.rows)
        opts = ConvertOptions(conversational, data_cfg.system)
        parts.append(convert(raw, standard, data_cfg.format, opts, found, row_check))
        if budget is not None and budget <= 0:
            break
    loaded = parts[0] if len(parts) == 1 else _join(parts)
    if problems is None:
        found.raise_if_any(loaded.source)
    return loaded


def _join(parts: list[Loaded]) -> Loaded:
    """Several sources' rows as one dataset.

    Raises:
        AlignError: SFT sources that convert to different row layouts (conversations and
            prompt/completion pairs): TRL trains one layout per dataset.
    """
    layouts: dict[str, str] = {}
    for part in parts:
        if part.rows:
            layouts.setdefault(_layout(part.rows[0]), part.source)
    if len(layouts) > 1:
        (a, sa), (b, sb) = list(layouts.items())[:2]
        raise AlignError(
            f"{sa} gives {a} rows and {sb} gives {b} rows: TRL trains one row layout per dataset; "
            "convert one file to the other's layout, or train them in separate runs"
        )
    first = next((p for p in parts if p.input_format is not None), parts[0])
    return Loaded(
        rows=[r for p in parts for r in p.rows],
        origins=[o for p in parts for o in p.origins],
        input_format=first.input_format,
        source=" + ".join(p.source for p in parts),
        columns=sorted({c for p in parts for c in p.columns}),
        rows_read=sum(p.rows_read for p in parts),
        files=[f for p in parts for f in p.files],
        warnings=[w for p in parts for w in p.warnings],
        formats=[p.input_format.name for p in parts if p.input_format],
    )


def _layout(row: dict) -> str:
    if "messages" in row:
        return "conversation (messages)"
    if "text" in row:
        return "plain text"
    return ", ".join(
        sorted(k for k in row if k in ("prompt", "completion", "chosen", "rejected", "completions"))
    )


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


def _to_dataset(rows: list[dict]) -> Dataset:
    from datasets import Dataset, Features, Json, List

    # Dataset.from_list takes its columns from the first row only: an optional column (e.g.
    # `margin`) that the first row lacks would vanish. Give every row every column (None if absent).
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        full = [{key: row.get(key) for key in columns} for row in rows]
        # Arrow gives every message the union of all messages' keys (`tool_calls: None` on a user
        # turn) and every tool call's arguments the union of all arguments (`{"city": "Oslo",
        # "unit": None}`): a chat template would render those. Messages with more than role and
        # content are stored as JSON instead, so each comes back as it was written.
        rich = [c for c in columns if any(_rich_messages(row.get(c)) for row in rows)]
        if not rich:
            return Dataset.from_list(full)
        plain = Dataset.from_list([{k: v for k, v in row.items() if k not in rich} for row in full]).features
        features = Features({c: List(Json()) if c in rich else plain[c] for c in columns})
        return Dataset.from_list(full, features=features)

    except Exception as err:
        import pyarrow

        if not isinstance(
            err, (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, pyarrow.ArrowNotImplementedError)
        ):
            raise
        # `mixed_type_rows` catches mixed columns by row; this is what it cannot see (values
        # nested inside lists or objects of different types).
        raise AlignError(
            f"the rows cannot be stored as one dataset: {one_line(str(err))}; give each column (and each "
            "field inside it) one type in every row"
        ) from None


@dataclass
class Splits:
    """The rows a run trains and evaluates on, as read and checked by `read_splits`.

    `train` is None only when nothing of it was readable (then its problems say why);
    `evaluation` holds rows read from `data.eval_path` / `data.eval_split`, and `held` the
    indices of the training rows that `data.eval_ratio` holds out instead.
    """

    train: Loaded | None
    evaluation: Loaded | None = None
    held: list[int] = field(default_factory=list)

    def loaded(self) -> tuple[Loaded, Loaded | None]:
        """The train and evaluation rows with their origins (held-out rows leave the training split)."""
        assert self.train is not None
        train = self.train
        if self.evaluation is not None or not self.held:
            return train, self.evaluation
        held = set(self.held)
        evaluation = dataclasses.replace(
            train,
            rows=[train.rows[i] for i in sorted(held)],
            origins=[train.origins[i] for i in sorted(held)],
        )
        train = dataclasses.replace(
            train,
            rows=[r for i, r in enumerate(train.rows) if i not in held],
            origins=[o for i, o in enumerate(train.origins) if i not in held],
        )
        return train, evaluation

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        """The train and evaluation datasets."""
        train, evaluation = self.loaded()
        return _to_dataset(train.rows), _to_dataset(evaluation.rows) if evaluation is not None else None


def read_splits(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    seed: int = 42,
    sample: str | None = None,
    tokenizer=None,
    room: PromptRoom | None = None,
    row_check: RowCheck | None = None,
    problems: tuple[Problems, Problems] | None = None,
) -> Splits:
    """Reads and checks both splits: every data check `align train` makes, in one place.

    `align train` (through `load_datasets`) stops at the first check that fails; `align data
    validate` passes `problems` and gets every problem of each split instead.

    Args:
        problems: (train, eval) collectors: note every problem and go on. None: raise.
        Other arguments: as for `load_datasets`.

    Raises:
        AlignError: only without `problems`: see `load_datasets`.
    """
    train_found, eval_found = problems if problems is not None else (None, None)

    def attempt(found: Problems | None, check: Callable, *args, **kwargs):
        if found is None:
            return check(*args, **kwargs)
        try:
            return check(*args, **kwargs)
        except AlignError as err:  # nothing readable, or a check of the whole split
            found.add(str(err))
            return None

    def fits(loaded: Loaded | None, found: Problems | None) -> None:
        if loaded is not None and loaded.rows:
            attempt(found, _fit, loaded, standard, tokenizer, room, data_cfg)

    train = attempt(
        train_found,
        read_and_convert,
        data_cfg,
        standard,
        conversational,
        sample,
        problems=train_found,
        row_check=row_check,
    )
    fits(train, train_found)
    splits = Splits(train)
    if has_eval_source(data_cfg):
        splits.evaluation = attempt(
            eval_found,
            read_and_convert,
            data_cfg,
            standard,
            conversational,
            sample,
            evaluation=True,
            problems=eval_found,
            row_check=row_check,
        )
        if splits.evaluation is not None and train is not None:
            attempt(eval_found, check_disjoint, train, splits.evaluation, data_cfg)
        fits(splits.evaluation, eval_found)
    elif train is not None and train.rows:
        splits.held = (
            attempt(train_found, held_out, train.rows, data_cfg.eval_ratio, seed, train.origins) or []
        )
    return splits


def _rich_messages(value) -> bool:
    """Whether a column value is a list of messages with keys beyond role and content."""
    return isinstance(value, list) and any(
        isinstance(m, dict) and set(m) - {"role", "content"} for m in value
    )


def load_datasets(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    seed: int = 42,
    sample: str | None = None,
    tokenizer=None,
    room: PromptRoom | None = None,
    row_check: RowCheck | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Loads the train split and the evaluation split in the method's standard format.

    Every row is read and checked first (`read_splits`); a bad dataset raises before anything
    else happens.

    Args:
        data_cfg: the `data` config.
        standard: the method's standard format (see formats.py).
        conversational: emit chat messages (the tokenizer has a chat template) or plain text.
        seed: picks the held-out prompts reproducibly (see `held_out`).
        sample: the method's sample file in data_samples/, used when data.path is null.
        tokenizer: with `room`, checks that every prompt fits in it.
        room: the most tokens a prompt may have (the method's `PromptRoom`).
        row_check: an extra check of each converted row, in both splits (e.g.
            `align_cli.rewards.row_check`: values the configured rewards cannot use).

    Raises:
        AlignError: unreadable or empty data, columns that fit no input format of `standard`,
            prompts too long; DataError (a subclass) for bad rows: the first and the count.
    """
    return read_splits(
        data_cfg, standard, conversational, seed, sample, tokenizer, room, row_check
    ).datasets()


def _fit(loaded: Loaded, standard: str, tokenizer, room: PromptRoom | None, data_cfg: DataConfig) -> None:
    if tokenizer is None:
        return
    if tokenizer.chat_template is not None:
        check_tool_rendering(loaded, tokenizer)
    if room is not None:
        note = check_prompt_lengths(loaded, standard, tokenizer, room, data_cfg.too_long)
        if note:
            log.warning("%s", note)
            loaded.warnings.append(note)
