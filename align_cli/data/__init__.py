"""The data layer: read a dataset, pick its input format, convert it, split off evaluation.

from align_cli.data import load_datasets
train, evaluation = load_datasets(cfg.data, "preference", conversational=True, seed=42)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import SAMPLES_DIR, DataConfig
from ..errors import AlignError
from .formats import ConvertOptions, InputFormat, RowError, detect
from .lengths import measure, too_long
from .problems import Problems
from .readers import Rows, read_any

if TYPE_CHECKING:
    from datasets import Dataset


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


def data_path(data_cfg: DataConfig, sample: str | None) -> str:
    """The configured path, or the method's sample file when `data.path` is null."""
    if data_cfg.path:
        return data_cfg.path
    if not sample:
        raise AlignError("data.path is not set and this method has no sample dataset: set data.path=<file>")
    return str(SAMPLES_DIR / sample)


def rename_columns(raw: Rows, mapping: dict[str, str]) -> None:
    """Applies `data.columns` (our name -> the user's name) in place."""
    if not mapping:
        return
    present = set().union(*(r.keys() for r in raw.rows)) if raw.rows else set()
    for ours, theirs in mapping.items():
        if theirs not in present:
            raise AlignError(
                f"data.columns.{ours}={theirs}: {raw.source} has no column '{theirs}'; "
                f"columns found: {', '.join(sorted(present))}"
            )
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    raw.rows = [{inverse.get(k, k): v for k, v in row.items()} for row in raw.rows]


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
            return Loaded([], [], None, raw.source)
        raise AlignError(f"{raw.source}: the dataset is empty")
    columns = set().union(*(r.keys() for r in raw.rows))
    fmt = detect(standard, columns, requested, raw.source)
    found = problems if problems is not None else Problems()
    rows, origins = [], []
    for row, origin in zip(raw.rows, raw.origins, strict=True):
        missing = [c for c in fmt.required if c not in row]
        try:
            if missing:
                raise RowError(
                    f"missing column(s) {', '.join(missing)}; this row has: {', '.join(row) or 'none'}"
                )
            converted = fmt.convert(row, opts)
        except RowError as err:
            found.add(f"{origin}: {err} ({fmt.name} format)")
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            # A shape no check anticipated (e.g. `history` that is not a list of pairs): still
            # a problem of this row, not a crash.
            found.add(f"{origin}: cannot read this row as {fmt.name} ({type(err).__name__}: {err})")
        else:
            problem = row_check(converted) if row_check is not None else None
            if problem:
                found.add(f"{origin}: {problem}")
            else:
                rows.append(converted)
                origins.append(origin)
    if problems is None:
        found.raise_if_any(raw.source)
    return Loaded(rows, origins, fmt, raw.source, sorted(columns), len(raw.rows))


def read_and_convert(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    sample: str | None = None,
    split: str | None = None,
    path: str | None = None,
    problems: Problems | None = None,
    row_check: RowCheck | None = None,
) -> Loaded:
    """Reads and converts one split; every bad row is collected before stopping.

    Args:
        problems: where to collect bad rows and go on (`align data validate`); None raises a
            DataError naming the first bad row and the count once all rows were read.
        row_check: an extra check of each converted row (see `convert`).
    """
    found = problems if problems is not None else Problems()
    raw = read_any(path or data_path(data_cfg, sample), data_cfg.subset, split or data_cfg.split, found)
    rename_columns(raw, dict(data_cfg.columns))
    if data_cfg.max_samples:
        raw.rows, raw.origins = raw.rows[: data_cfg.max_samples], raw.origins[: data_cfg.max_samples]
    opts = ConvertOptions(conversational, data_cfg.system)
    loaded = convert(raw, standard, data_cfg.format, opts, found, row_check)
    if problems is None:
        found.raise_if_any(raw.source)
    return loaded


def long_prompts_problem(loaded: Loaded, prompt_lengths: list[int], max_length: int) -> str | None:
    """The message for prompts that leave no room for an answer within `max_length`, or None."""
    long = too_long(prompt_lengths, max_length)
    if not long:
        return None
    first = long[0]
    return (
        f"{len(long)} of {len(prompt_lengths)} prompts are at least model.max_length={max_length} tokens "
        f"long, leaving no room for the answer; first: {loaded.origins[first]} ({prompt_lengths[first]} tokens): "
        "raise model.max_length or shorten these prompts"
    )


def check_prompt_lengths(loaded: Loaded, standard: str, tokenizer, max_length: int) -> None:
    """Raises AlignError when prompts fill `max_length` on their own (count and first row)."""
    lengths = measure(loaded.rows, standard, tokenizer, prompts_only=True)
    message = long_prompts_problem(loaded, lengths.prompt, max_length)
    if message:
        raise AlignError(message)


def _to_dataset(rows: list[dict]) -> Dataset:
    from datasets import Dataset

    # Dataset.from_list takes its columns from the first row only: an optional column (e.g.
    # `margin`) that the first row lacks would vanish. Give every row every column (None if absent).
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def load_datasets(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    seed: int = 42,
    sample: str | None = None,
    tokenizer=None,
    max_length: int | None = None,
    row_check: RowCheck | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Loads the train split and the evaluation split in the method's standard format.

    Every row is read and checked first; a bad dataset raises before anything else happens.

    Args:
        data_cfg: the `data` config.
        standard: the method's standard format (see formats.py).
        conversational: emit chat messages (the tokenizer has a chat template) or plain text.
        seed: shuffles the held-out split reproducibly.
        sample: the method's sample file in data_samples/, used when data.path is null.
        tokenizer: with `max_length`, checks that no prompt fills the maximum length on its own.
        max_length: the model's maximum length (prompt + answer tokens).
        row_check: an extra check of each converted row, in both splits (e.g.
            `align_cli.rewards.row_check`: values the configured rewards cannot use).

    Raises:
        AlignError: unreadable or empty data, columns that fit no input format of `standard`,
            prompts too long; DataError (a subclass) for bad rows: the first and the count.
    """
    train = read_and_convert(data_cfg, standard, conversational, sample, row_check=row_check)
    if tokenizer is not None and max_length:
        check_prompt_lengths(train, standard, tokenizer, max_length)
    if data_cfg.eval_split:
        evaluation = read_and_convert(
            data_cfg, standard, conversational, sample, split=data_cfg.eval_split, row_check=row_check
        )
        if tokenizer is not None and max_length:
            check_prompt_lengths(evaluation, standard, tokenizer, max_length)
        return _to_dataset(train.rows), _to_dataset(evaluation.rows)
    if not 0 <= data_cfg.eval_ratio < 1:
        raise AlignError(f"data.eval_ratio={data_cfg.eval_ratio} must be in [0, 1)")
    n_eval = int(round(len(train.rows) * data_cfg.eval_ratio))
    if data_cfg.eval_ratio == 0 or n_eval == 0 or len(train.rows) - n_eval < 1:
        return _to_dataset(train.rows), None
    import random

    order = list(range(len(train.rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train_rows = [r for i, r in enumerate(train.rows) if i not in held]
    eval_rows = [train.rows[i] for i in sorted(held)]
    return _to_dataset(train_rows), _to_dataset(eval_rows)
