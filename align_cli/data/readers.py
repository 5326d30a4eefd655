"""Reading rows from JSON, JSONL, CSV and Parquet files, and hub datasets.

Local files are read here rather than through `datasets.load_dataset` so that every row keeps
its origin (`file:line`): a bad row is then reported where the user can fix it.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlignError
from .problems import Problems

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Rows:
    """Rows as plain dicts with where each came from (`origins[i]` is "file:line" or "id[i]")."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    source: str = ""

    def extend(self, other: Rows) -> None:
        self.rows += other.rows
        self.origins += other.origins


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise AlignError(f"{path}:{line}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None
    except OSError as err:
        raise AlignError(f"{path}: cannot read the file ({err.strerror})") from None


def _row_problem(problems: Problems | None, message: str) -> None:
    """Stops at the first bad row, or notes it and reads on when collecting."""
    if problems is None:
        raise AlignError(message)
    problems.add(message)


def read_jsonl(path: Path, problems: Problems | None = None) -> Rows:
    out = Rows(source=str(path))
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            _row_problem(problems, f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            _row_problem(
                problems, f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}"
            )
            continue
        out.rows.append(row)
        out.origins.append(f"{path}:{lineno}")
    return out


def _object_lines(text: str) -> list[int]:
    """Line numbers of the top-level array's elements, for error messages on .json files."""
    lines, depth, in_str, esc, line = [], 0, False, False, 1
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            esc = not esc and ch == "\\"
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def read_json(path: Path, problems: Problems | None = None) -> Rows:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file holding JSON lines is common; read it as such.
        if err.msg == "Extra data":
            return read_jsonl(path, problems)
        raise AlignError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]}: take the single list inside.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise AlignError(f"{path}: expected a JSON array of objects (or JSON lines), got an object")
        data = lists[0]
    if not isinstance(data, list):
        raise AlignError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    lines = _object_lines(text)
    out = Rows(source=str(path))
    for i, row in enumerate(data):
        where = f"{path}:{lines[i] if i < len(lines) else 1}"
        if not isinstance(row, dict):
            _row_problem(problems, f"{where}: each element must be a JSON object, got {type(row).__name__}")
            continue
        out.rows.append(row)
        out.origins.append(where)
    return out


def read_csv(path: Path, problems: Problems | None = None) -> Rows:
    out = Rows(source=str(path))
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    for row in reader:
        # DictReader's line_num is the physical line just read (quoted newlines included).
        if None in row:  # more values than header columns: usually an unquoted comma
            _row_problem(
                problems,
                f"{path}:{reader.line_num}: {len(reader.fieldnames or []) + len(row[None])} values for "
                f"{len(reader.fieldnames or [])} header columns (quote values that contain commas)",
            )
            continue
        out.rows.append(dict(row))
        out.origins.append(f"{path}:{reader.line_num}")
    return out


def read_parquet(path: Path, problems: Problems | None = None) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise AlignError(f"{path}: cannot read Parquet ({err})") from None
    rows = table.to_pylist()
    return Rows(rows=rows, origins=[f"{path}:row {i + 1}" for i in range(len(rows))], source=str(path))


READERS = {"json": read_json, "jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}


def read_file(path: Path, problems: Problems | None = None) -> Rows:
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise AlignError(
            f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet"
        )
    return READERS[kind](path, problems)


def read_hub(name: str, subset: str | None, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ValueError as err:  # unknown split
        raise AlignError(f"dataset '{name}': {str(err).splitlines()[0]}") from None
    except Exception as err:  # offline, not found, gated...
        raise AlignError(
            f"data.path '{name}' is not a local file or folder, and loading it as a hub dataset failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    rows = ds.to_list()
    return Rows(rows=rows, origins=[f"{name}[{split}] row {i}" for i in range(len(rows))], source=name)


def read_any(
    path: str, subset: str | None = None, split: str = "train", problems: Problems | None = None
) -> Rows:
    """Reads a file, every supported file in a folder, or a hub dataset id.

    Args:
        path: a file, a folder or a hub dataset id.
        subset: the hub dataset's configuration name.
        split: the hub dataset's split.
        problems: where to note bad rows (malformed JSON lines...) and read on; None stops at
            the first.

    Raises:
        AlignError: the path does not exist (and is not a hub id), or a file is unreadable.
    """
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return read_file(p, problems)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS)
        if not files:
            raise AlignError(f"data.path '{path}': the folder holds no .json, .jsonl, .csv or .parquet file")
        out = Rows(source=str(p))
        for f in files:
            out.extend(read_file(f, problems))
        return out
    if path.startswith((".", "/", "~")) or p.suffix.lower() in EXTENSIONS or path.count("/") > 1:
        raise AlignError(f"data.path '{path}' does not exist")
    return read_hub(path, subset, split)
