"""What `data.path` names: one file, folder or hub id; a list of them (each optionally cut to a row
count or a share); or a LLaMA-Factory `dataset_info.json` with `data.dataset` naming an entry.

    data.path=[a.jsonl,b.json]                          # both files, every row
    data.path='[{path: a.jsonl, rows: 200}, {path: b.json, share: 0.5}]'
    data.path=LLaMA-Factory/data/dataset_info.json data.dataset=dpo_en_demo

A registry entry is read with its own column and tag mapping (`columns`, `tags`): its columns
are renamed to the names our layouts read, and sharegpt turns are rewritten to our tags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlignError, nearest


@dataclass
class Source:
    """One place rows come from, and how much of it to take."""

    path: str
    rows: int | None = None  # the first N rows
    share: float | None = None  # this fraction of the rows (the first ones)
    subset: str | None = None
    split: str | None = None  # a registry entry's own split (hub datasets)
    rename: dict[str, str] = field(default_factory=dict)  # the file's name -> ours (registry)
    tags: dict[str, str] = field(default_factory=dict)  # registry: sharegpt keys and tag values
    formatting: str | None = None  # registry: alpaca | sharegpt


def sources(value: Any, key: str = "data.path") -> list[Source]:
    """`data.path` as a list of sources.

    Raises:
        AlignError: an entry that is not a path or {path, rows|share}, or a bad count or share.
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise AlignError(f"{key}=[] names no file: give a file, a folder, a hub id or a list of them")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
        if isinstance(item, str) and item.strip():
            out.append(Source(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise AlignError(
                f"{where}={item!r:.60} is not valid: give a path, or {{path: <file>, rows: <n>}} / "
                "{path: <file>, share: <0..1>}"
            )
        unknown = set(item) - {"path", "rows", "share"}
        if unknown:
            name = sorted(unknown)[0]
            raise AlignError(f"{where}.{name} is not a key of a data.path entry; valid: path, rows, share")
        rows, share = item.get("rows"), item.get("share")
        if rows is not None and share is not None:
            raise AlignError(f"{where}: give rows or share, not both")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise AlignError(f"{where}.rows={rows!r} must be a whole number of rows, at least 1")
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1
        ):
            raise AlignError(f"{where}.share={share!r} must be a fraction in (0, 1]")
        out.append(Source(item["path"], rows=rows, share=share))
    return out


def take(rows: list, origins: list, source: Source) -> tuple[list, list]:
    """The part of a file's rows that `rows` / `share` asks for (the first ones, in file order)."""
    n = source.rows if source.rows is not None else None
    if source.share is not None:
        n = max(1, round(len(rows) * source.share))
    return (rows, origins) if n is None else (rows[:n], origins[:n])


# LLaMA-Factory's column names -> the names our layouts read, per formatting.
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "kto_tag",
    "tools": "tools",
}
SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": "system",
    "tools": "tools",
    "chosen": "chosen",
    "rejected": "rejected",
    "kto_tag": "kto_tag",
}
# LLaMA-Factory's tag keys -> our sharegpt `from` values.
TAG_ROLES = {
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
TAG_DEFAULTS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


def is_registry(path: str) -> bool:
    """Whether `path` is a LLaMA-Factory dataset registry (a file named dataset_info.json)."""
    return Path(os.path.expanduser(path)).name == "dataset_info.json"


def from_registry(path: str, dataset: str | None) -> Source:
    """The source a LLaMA-Factory `dataset_info.json` entry describes.

    Raises:
        AlignError: no `data.dataset`, a name not in the file (nearest and all names listed), an
            entry without file_name / hf_hub_url, or a formatting we do not read.
    """
    p = Path(os.path.expanduser(path))
    try:
        registry = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AlignError(f"data.path={path}: cannot read this dataset_info.json ({err})") from None
    if not isinstance(registry, dict):
        raise AlignError(f"data.path={path}: a dataset_info.json is an object of named datasets")
    names = sorted(registry)
    if not dataset:
        raise AlignError(
            f"data.path={path} is a dataset registry: name one of its datasets with data.dataset=<name> "
            f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
        )
    if dataset not in registry:
        raise AlignError(
            f"data.dataset={dataset} is not in {path}{nearest(dataset, names)}; its datasets: {', '.join(names)}"
        )
    entry = registry[dataset]
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise AlignError(
            f"{path}: dataset '{dataset}' has formatting={formatting!r}; align reads alpaca and sharegpt"
        )
    if entry.get("file_name"):
        target, subset, split = str(p.parent / entry["file_name"]), None, None
    elif entry.get("hf_hub_url"):
        target, subset, split = entry["hf_hub_url"], entry.get("subset"), entry.get("split")
    else:
        raise AlignError(
            f"{path}: dataset '{dataset}' has neither file_name nor hf_hub_url (align reads those two)"
        )
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns = entry.get("columns") or {}
    unknown = set(columns) - set(defaults)
    if unknown:
        raise AlignError(
            f"{path}: dataset '{dataset}' maps column(s) {', '.join(sorted(unknown))}, which align does not read "
            f"for {formatting} data (it reads {', '.join(defaults)})"
        )
    # Ours <- theirs: the registry says which column of the file holds each of its names.
    rename = {columns.get(theirs, theirs): ours for theirs, ours in defaults.items()}
    tags = {**TAG_DEFAULTS, **(entry.get("tags") or {})} if formatting == "sharegpt" else {}
    return Source(target, subset=subset, split=split, rename=rename, tags=tags, formatting=formatting)


def registry_rows(rows: list[dict], source: Source) -> list[dict]:
    """Rows of a registry entry with our column names, sharegpt turns rewritten to our tags."""
    out = []
    for row in rows:
        new = {source.rename.get(k, k): v for k, v in row.items()}
        if source.formatting == "sharegpt":
            for key in ("conversations", "chosen", "rejected"):
                if key in new:
                    new[key] = _retag(new[key], source.tags)
            if "kto_tag" in new:  # sharegpt KTO: the conversation ends with the judged answer
                new["label"] = new.pop("kto_tag")
        out.append(new)
    return out


def _retag(turns: Any, tags: dict[str, str]) -> Any:
    """A registry's turns ({role_tag: its tag, content_tag: text}) as {from: ours, value: text};
    anything unexpected is left as it is, for the converter to report."""
    ours = {tags[k]: v for k, v in TAG_ROLES.items() if k in tags}
    role, content = tags["role_tag"], tags["content_tag"]

    def one(turn):
        if isinstance(turn, dict) and role in turn:
            return {"from": ours.get(turn[role], turn[role]), "value": turn.get(content)}
        return turn

    return [one(t) for t in turns] if isinstance(turns, list) else one(turns)
