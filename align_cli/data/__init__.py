"""The data layer: read a dataset, pick its input format, convert it, split off evaluation.

from align_cli.data import load_datasets
train, evaluation = load_datasets(cfg.data, "preference", conversational=True, seed=42)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import SAMPLES_DIR, DataConfig
from ..errors import AlignError
from .formats import ConvertOptions, InputFormat, RowError, detect
from .readers import Rows, read_any

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class Loaded:
    """Converted rows and what was detected about them."""

    rows: list[dict]
    origins: list[str]
    input_format: InputFormat
    source: str


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


def convert(raw: Rows, standard: str, requested: str, opts: ConvertOptions) -> Loaded:
    """Converts every row; the first bad row stops with its origin and what is wrong."""
    if not raw.rows:
        raise AlignError(f"{raw.source}: the dataset is empty")
    columns = set().union(*(r.keys() for r in raw.rows))
    fmt = detect(standard, columns, requested, raw.source)
    rows = []
    for row, origin in zip(raw.rows, raw.origins, strict=True):
        missing = [c for c in fmt.required if c not in row]
        try:
            if missing:
                raise RowError(f"missing column(s) {', '.join(missing)}")
            rows.append(fmt.convert(row, opts))
        except RowError as err:
            raise AlignError(f"{origin}: {err} ({fmt.name} format)") from None
    return Loaded(rows, list(raw.origins), fmt, raw.source)


def read_and_convert(
    data_cfg: DataConfig,
    standard: str,
    conversational: bool,
    sample: str | None = None,
    split: str | None = None,
    path: str | None = None,
) -> Loaded:
    raw = read_any(path or data_path(data_cfg, sample), data_cfg.subset, split or data_cfg.split)
    rename_columns(raw, dict(data_cfg.columns))
    if data_cfg.max_samples:
        raw.rows, raw.origins = raw.rows[: data_cfg.max_samples], raw.origins[: data_cfg.max_samples]
    return convert(raw, standard, data_cfg.format, ConvertOptions(conversational, data_cfg.system))


def _to_dataset(rows: list[dict]) -> Dataset:
    from datasets import Dataset

    # Dataset.from_list takes its columns from the first row only: an optional column (e.g.
    # `margin`) that the first row lacks would vanish. Give every row every column (None if absent).
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def load_datasets(
    data_cfg: DataConfig, standard: str, conversational: bool, seed: int = 42, sample: str | None = None
) -> tuple[Dataset, Dataset | None]:
    """Loads the train split and the evaluation split in the method's standard format.

    Args:
        data_cfg: the `data` config.
        standard: the method's standard format (see formats.py).
        conversational: emit chat messages (the tokenizer has a chat template) or plain text.
        seed: shuffles the held-out split reproducibly.
        sample: the method's sample file in data_samples/, used when data.path is null.
    """
    train = read_and_convert(data_cfg, standard, conversational, sample)
    if data_cfg.eval_split:
        evaluation = read_and_convert(data_cfg, standard, conversational, sample, split=data_cfg.eval_split)
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
