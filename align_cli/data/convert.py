"""One split's rows, read and converted: the sources of `data.path` (or the eval split's), their
columns renamed, each row converted from its input layout to the method's standard format and
checked, bad rows collected (file:line) before stopping, several sources joined.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import SAMPLES_DIR, DataConfig
from ..errors import AlignError, nearest
from .fields import ConvertOptions
from .formats import (
    InputFormat,
    describe_columns,
    detect,
    keeps_extra,
    known_columns,
    unread_columns,
)
from .problems import Problems, RowError
from .readers import Rows, read_any
from .sources import from_registry, is_registry, registry_rows, sources, take

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
