"""The data layer: read a dataset, pick its input format, convert it, split off evaluation.

Here: both splits read and checked (`read_splits`, `load_datasets`) and stored as datasets.
Reading and converting one split is convert.py; where evaluation rows come from, holdout.py;
the checks against the tokenizer, fit.py.

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
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import DataConfig
from ..errors import AlignError, one_line
from .convert import Loaded, RowCheck, read_and_convert
from .fit import PromptRoom, fit_rows
from .holdout import check_disjoint, has_eval_source, held_out
from .problems import Problems

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("align")


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
            attempt(found, fit_rows, loaded, standard, tokenizer, room, data_cfg)

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
