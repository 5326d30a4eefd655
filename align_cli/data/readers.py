"""Reading rows from JSON, JSONL, CSV and Parquet files, and hub datasets.

Local files are read here rather than through `datasets.load_dataset` so that every row keeps
its origin (`file:line`): a bad row is then reported where the user can fix it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlignError
from .problems import Problems

log = logging.getLogger("align")
BIG_FILE = 100 * 2**20  # bytes: above this, say that the file is read whole before anything else

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Names that mark a folder as holding splits, as `datasets` recognises them: `train.jsonl`,
# `test-00000-of-00001.parquet`, `validation/`. A folder with none of these (nor a file named
# for the split asked for) is one dataset, all its files together.
SPLIT_NAMES = frozenset(
    {"train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"}
)


@dataclass
class Rows:
    """Rows as plain dicts with where each came from (`origins[i]` is "file:line" or "id[i]")."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    source: str = ""
    files: list[str] = field(default_factory=list)  # what was read: resolved paths, or "hub:id[split]"
    renamed: dict[str, str] = field(default_factory=dict)  # by data.columns: our name -> the file's

    def extend(self, other: Rows) -> None:
        self.rows += other.rows
        self.origins += other.origins
        self.files += other.files


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


def _lines(text: str) -> list[str]:
    """The lines of a file, split at "\n" only (each keeps its "\n"; "\r\n" keeps its "\r").

    Not `str.splitlines()`: that also splits at U+2028, U+2029, \x85, \x0b, \x0c and \x1c-\x1e,
    which JSON strings may hold unescaped (`json.dumps(..., ensure_ascii=False)` writes them
    as they are) and CSV values too; splitting there would cut a valid row in two.
    """
    lines = text.split("\n")
    last = lines.pop()  # after the last "\n": a line without one, or "" when the file ends with one
    return [line + "\n" for line in lines] + ([last] if last else [])


def read_jsonl(path: Path, problems: Problems | None = None) -> Rows:
    out = Rows(source=str(path))
    for lineno, line in enumerate(_lines(_read_text(path)), start=1):
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


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def _element_offsets(text: str, i: int) -> list[int]:
    """Where each element of the JSON array opening at `text[i]` begins (`text` is valid JSON)."""
    offsets: list[int] = []
    i = _skip(text, i + 1)
    while text[i] != "]":
        offsets.append(i)
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return offsets


def _member_offset(text: str, i: int, key: str) -> int:
    """Where the value of `key` begins in the JSON object opening at `text[i]` (the last one,
    which is the one `json.loads` keeps)."""
    found = i
    i = _skip(text, i + 1)
    while text[i] != "}":
        name, i = _DECODER.raw_decode(text, i)
        i = _skip(text, _skip(text, i) + 1)  # past the ':'
        if name == key:
            found = i
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return found


def _line_numbers(text: str, offsets: list[int]) -> list[int]:
    """The line of each offset (in increasing order), counting "\n" as JSON's errors do."""
    lines, line, last = [], 1, 0
    for offset in offsets:
        line += text.count("\n", last, offset)
        lines.append(line)
        last = offset
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
    start = _skip(text, 0)
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]}: take the single list inside.
        keys = [k for k, v in data.items() if isinstance(v, list)]
        if len(keys) != 1:
            raise AlignError(f"{path}: expected a JSON array of objects (or JSON lines), got an object")
        data = data[keys[0]]
        start = _member_offset(text, start, keys[0])
    if not isinstance(data, list):
        raise AlignError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    # Each row's origin is the line where it begins: the file parses again, element by element.
    lines = _line_numbers(text, _element_offsets(text, start))
    out = Rows(source=str(path))
    for i, row in enumerate(data):
        where = f"{path}:{lines[i]}"
        if not isinstance(row, dict):
            _row_problem(problems, f"{where}: each element must be a JSON object, got {type(row).__name__}")
            continue
        out.rows.append(row)
        out.origins.append(where)
    return out


def _open_quote(lines: list[str]) -> int | None:
    """Where a quoted field left open at the end of `lines` (one CSV record) began, or None.

    Follows the csv module's default, lenient dialect: a `"` opens quoting only at the start of
    a field (`5" screen` is text), `""` inside quotes is a quote, and text after a closing
    quote reads on unquoted.

    Returns:
        The index in `lines` of the line holding the opening quote.
    """
    state, opened = "start", 0  # start: of a field; text; quoted: inside quotes; quote: just after one
    for i, line in enumerate(lines):
        for ch in line:
            if state == "quoted":
                if ch == '"':
                    state = "quote"
            elif ch == '"' and state == "start":
                state, opened = "quoted", i
            elif ch == '"' and state == "quote":
                state = "quoted"  # "" inside quotes: a literal quote
            elif ch in ",\r\n":
                state = "start"
            else:
                state = "text"
    return opened if state == "quoted" else None


def _unterminated(path: Path, line: int) -> str:
    return (
        f'{path}:{line}: unterminated quoted field (a " opened here is never closed, so the rest of the '
        'file would be one value): close it, or write a literal " inside a quoted value as ""'
    )


def read_csv(path: Path, problems: Problems | None = None) -> Rows:
    out = Rows(source=str(path))
    # Lines as the csv module wants them (a file opened with newline=""): split at \n, \r\n
    # and \r only, so a value may hold U+2028 and the like, and line numbers match an editor's.
    lines = io.StringIO(_read_text(path), newline="").readlines()
    reader = csv.reader(lines)
    header: list[str] | None = None
    end = 0  # the last line of the record read last
    while True:
        start = end + 1  # a record may span lines (newlines in a quoted value): name its first
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            # A quote opened and never closed runs into the field size limit on a large file.
            opened = _open_quote(lines[start - 1 : reader.line_num])
            message = (
                _unterminated(path, start + opened)
                if opened is not None
                else f"{path}:{start}: cannot read as CSV ({err})"
            )
            _row_problem(problems, message)
            break  # the reader cannot find the next record reliably: stop here
        end = reader.line_num
        if end == len(lines):  # the last record: did a quote left open swallow the rest of the file?
            opened = _open_quote(lines[start - 1 : end])
            if opened is not None:
                _row_problem(problems, _unterminated(path, start + opened))
                break
        if not values:  # a blank line
            continue
        if header is None:
            header = values
            continue
        if len(values) > len(header):  # more values than header columns: usually an unquoted comma
            _row_problem(
                problems,
                f"{path}:{start}: {len(values)} values for {len(header)} header columns "
                "(quote values that contain commas)",
            )
            continue
        out.rows.append({name: values[i] if i < len(values) else None for i, name in enumerate(header)})
        out.origins.append(f"{path}:{start}")
    return out


def read_parquet(path: Path, problems: Problems | None = None) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise AlignError(f"{path}: cannot read Parquet ({err})") from None
    rows = table.to_pylist()
    return Rows(rows=rows, origins=[f"{path}:row {i + 1}" for i in range(len(rows))], source=str(path))


def read_text(path: Path, problems: Problems | None = None) -> Rows:
    """Plain text: one `text` row per non-blank line (as `datasets`' text loader reads it)."""
    out = Rows(source=str(path))
    for lineno, line in enumerate(_lines(_read_text(path)), start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            out.rows.append({"text": line})
            out.origins.append(f"{path}:{lineno}")
    return out


READERS = {
    "json": read_json,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
    "text": read_text,
}


def read_file(path: Path, problems: Problems | None = None) -> Rows:
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise AlignError(
            f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv, .parquet or .txt"
        )
    size = path.stat().st_size
    if size > BIG_FILE:
        # Every row is read and checked before training starts (origins, problems, lengths):
        # a big file takes a while and memory several times its size. Measured: a 30 MB
        # preference JSONL read and converted in 1 s with 130 MB of memory, before token counting.
        log.warning(
            "%s: %d MB is read whole and checked row by row before anything else (about %d s to read and "
            "convert, then token counting, and %d MB of memory); data.max_samples=<n> checks fewer rows",
            path,
            size // 2**20,
            max(1, size // (30 * 2**20)),
            size * 5 // 2**20,
        )
    rows = READERS[kind](path, problems)
    rows.files = [str(path.resolve())]
    return rows


def read_hub(name: str, subset: str | None, split: str, key: str = "data.split") -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ValueError as err:  # unknown split
        raise AlignError(f"{key}={split}: dataset '{name}': {str(err).splitlines()[0]}") from None
    except Exception as err:  # offline, not found, gated...
        raise AlignError(
            f"data.path '{name}' is not a local file or folder, and loading it as a hub dataset failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    rows = ds.to_list()
    origins = [f"{name}[{split}] row {i}" for i in range(len(rows))]
    return Rows(rows=rows, origins=origins, source=name, files=[f"hub:{name}/{subset or ''}[{split}]"])


def split_name(name: str) -> str:
    """The split a file or folder name stands for: the name up to its first '-', '_', '.' or space."""
    return re.split(r"[-_. ]", name, maxsplit=1)[0].lower()


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in EXTENSIONS and not f.name.startswith(".")
    )


def folder_splits(folder: Path, split_names=()) -> dict[str, list[Path]] | None:
    """A folder's data files by split, or None when the folder is not divided into splits.

    A split is the files named for it (`train.jsonl`, `train-00001.parquet`) and the files in a
    subfolder named for it (`train/`). The folder is divided into splits when one of its names
    is a usual split name (SPLIT_NAMES) or one of `split_names` (the splits the config asks for).
    """
    splits: dict[str, list[Path]] = {}
    for f in _data_files(folder):
        splits.setdefault(split_name(f.stem), []).append(f)
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = _data_files(sub)
        if files:
            splits.setdefault(split_name(sub.name), []).extend(files)
    wanted = SPLIT_NAMES | {s.lower() for s in split_names if s}
    return splits if wanted & splits.keys() else None


def local_files(
    path: Path, split: str | None, key: str = "data.split", split_names=(), path_key: str = "data.path"
) -> list[Path]:
    """The files of one split of a local file or folder.

    Args:
        path: an existing file or folder.
        split: the split to read; None (or "train" for undivided data) means all of it.
        key: the config key that asked for `split`, for messages.
        split_names: every split the config names (a folder file named for one marks a split).
        path_key: the config key that gave `path`, for messages.

    Raises:
        AlignError: the split does not exist here (names the path, the split, the splits found),
            or a divided folder was given without a split.
    """
    if path.is_file():
        if split not in (None, "train"):
            raise AlignError(
                f"{key}={split}: {path} is a single file, so it has no split '{split}'; a split is a "
                "hub dataset's or the files named for it in a folder (train.jsonl, test.jsonl): point "
                "data.path at such a folder, or set data.eval_path=<file> for a separate evaluation file"
            )
        return [path]
    splits = folder_splits(path, split_names)
    if splits is None:
        files = _data_files(path)
        if not files:
            raise AlignError(f"{path_key} '{path}': the folder holds no .json, .jsonl, .csv or .parquet file")
        if split not in (None, "train"):
            raise AlignError(
                f"{key}={split}: {path} has no split '{split}'; splits found: none (its files "
                f"{', '.join(f.name for f in files[:5])}{', ...' if len(files) > 5 else ''} are one dataset; "
                "name split files train.jsonl, test.jsonl, ... or set data.eval_path=<file>)"
            )
        return files
    if split is None:
        raise AlignError(
            f"{path_key}={path} holds the splits {', '.join(sorted(splits))}: choose one with {key}=<split>"
        )
    if split.lower() not in splits:
        raise AlignError(
            f"{key}={split}: {path} has no split '{split}'; splits found: {', '.join(sorted(splits))}"
        )
    return splits[split.lower()]


def read_any(
    path: str,
    subset: str | None = None,
    split: str | None = "train",
    problems: Problems | None = None,
    key: str = "data.split",
    split_names=(),
    path_key: str = "data.path",
) -> Rows:
    """Reads a file, a folder (one of its splits, or all of it), or a hub dataset's split.

    Args:
        path: a file, a folder or a hub dataset id.
        subset: the hub dataset's configuration name.
        split: the split (see `local_files` for local data); None: all of a local file or folder.
        problems: where to note bad rows (malformed JSON lines...) and read on; None stops at
            the first.
        key: the config key that chose `split`, for messages.
        split_names: every split the config names.
        path_key: the config key that gave `path`, for messages.

    Raises:
        AlignError: the path does not exist (and is not a hub id), the split does not exist, or
            a file is unreadable.
    """
    p = Path(os.path.expanduser(path))
    if p.exists():
        files = local_files(p, split, key, split_names, path_key)
        if len(files) == 1 and p.is_file():
            return read_file(p, problems)
        divided = split is not None and folder_splits(p, split_names) is not None
        out = Rows(source=f"{p} [{split}]" if divided else str(p))
        for f in files:
            out.extend(read_file(f, problems))
        return out
    if path.startswith((".", "/", "~")) or p.suffix.lower() in EXTENSIONS or path.count("/") > 1:
        raise AlignError(f"{path_key} '{path}' does not exist")
    if split is None:
        raise AlignError(f"{key} is not set: {path} is a hub dataset; name the split to read")
    return read_hub(path, subset, split, key)
