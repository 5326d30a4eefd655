"""`align generate`: answers for every row of a prompts file, written as JSON lines in batches,
resuming where an earlier call stopped (rows already in `output` are checked and skipped).

Loading, sampling settings and prompt rendering are shared with `align chat` (serve.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .config import DataConfig, ModelConfig
from .errors import AlignError
from .serve import (
    MODEL_ARG,
    Sampling,
    check_sampling,
    context_length,
    generation_config,
    load_for_generation,
    prompt_ids,
)

GENERATE_USAGE = (
    "align generate <run folder|model> data.path=<prompts file> output=<out.jsonl> "
    "[batch_size=8] [num_return_sequences=1] [temperature=0.7] [max_new_tokens=256]"
)


# DataConfig keys that only training reads.
GENERATE_UNUSED = {
    "model.name_or_path": MODEL_ARG,
    "data.eval_path": "is for training; generate answers every row of data.path",
    "data.eval_split": "is for training; generate answers every row of data.path",
    "data.eval_ratio": "is for training; generate answers every row of data.path (data.max_samples takes the first rows)",
}


@dataclass
class GenerateOptions(Sampling):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: str | None = None  # the JSON-lines file to write (appended to when resuming)
    batch_size: int = 8
    num_return_sequences: int = 1


def read_prompts(data_cfg: DataConfig, conversational: bool) -> tuple[list[dict], list[dict], str]:
    """The input rows as the file has them, the same rows converted to the `prompt` format PPO and
    GRPO read, and the source's name. Every bad row is named (file:line) before anything is generated.

    Raises:
        AlignError: no data.path, unreadable data, columns that fit no prompt layout; DataError
            for bad rows.
    """
    from .data.convert import check_column_names, convert, rename_columns
    from .data.fields import ConvertOptions
    from .data.problems import Problems
    from .data.readers import read_any

    if not data_cfg.path:
        raise AlignError(
            "align generate: data.path is not set: give the prompts file, e.g. data.path=prompts.jsonl"
        )
    mapping = dict(data_cfg.columns)
    check_column_names(mapping, "prompt")
    problems = Problems()
    raw = read_any(
        data_cfg.path, data_cfg.subset, data_cfg.split, problems, key="data.split", path_key="data.path"
    )
    problems.raise_if_any(raw.source)
    if data_cfg.max_samples:
        raw.rows, raw.origins = raw.rows[: data_cfg.max_samples], raw.origins[: data_cfg.max_samples]
    original = list(raw.rows)  # rename_columns makes new dicts: these keep the file's own names
    rename_columns(raw, mapping)
    loaded = convert(
        raw, "prompt", data_cfg.format, ConvertOptions(conversational, data_cfg.system), problems
    )
    problems.raise_if_any(raw.source)  # every row converted: `loaded.rows[i]` is `original[i]`
    return original, loaded.rows, raw.source


def _json_safe(row: dict) -> dict:
    return json.loads(json.dumps(row, ensure_ascii=False, default=str))


def done_rows(output: str, inputs: list[dict]) -> int:
    """How many rows `output` already holds (resuming), after checking they belong to `inputs`.

    A last line cut short (a run killed mid-write) is removed, so that row is generated again.

    Raises:
        AlignError: `output` is not our JSON lines, has more rows than the input, or a row whose
            input columns differ from the input row at the same position.
    """
    if not os.path.exists(output):
        return 0
    with open(output, "rb") as f:
        lines = f.read().split(b"\n")
    rows, good_end, offset = [], 0, 0
    for i, line in enumerate(lines):
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise AlignError(
                    f"{output}:{i + 1}: not a JSON line; choose another output, or remove the file to start over"
                ) from None
            break  # the last line, cut short by an interrupted run
        good_end = offset
    if len(rows) > len(inputs):
        raise AlignError(
            f"{output} holds {len(rows)} rows, more than the {len(inputs)} input rows: it was written for other "
            "prompts; choose another output"
        )
    for i, (done, row) in enumerate(zip(rows, inputs, strict=False)):
        expected = _json_safe(row)
        if {k: done.get(k) for k in expected} != expected or not ({"completion", "completions"} & set(done)):
            raise AlignError(
                f"{output}:{i + 1} does not match input row {i + 1} (resuming keeps rows whose input columns are "
                "the same): choose another output, or remove the file to start over"
            )
    size = os.path.getsize(output)
    with open(output, "rb+") as f:
        f.truncate(min(good_end, size))  # drops a cut-short last line
        if good_end > size:  # the last row has no newline yet: the next one must start a line
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
    return len(rows)


def generate_main(argv: list[str]) -> None:
    """Entry for `align generate <model> data.path=... output=... [key=value ...]`."""
    import time

    from . import options

    (path,), overrides = options.split_args(argv, 1, GENERATE_USAGE)
    opts = options.parse(GenerateOptions, overrides, "align generate", GENERATE_UNUSED)
    opts.quiet = opts.quiet or options.quiet_flag(argv)
    opts.model.name_or_path = path
    check_sampling(opts, "align generate")
    if not opts.output:
        raise AlignError(f"align generate: output is not set: add output=<file.jsonl> ({GENERATE_USAGE})")
    if not opts.data.path:
        raise AlignError(
            "align generate: data.path is not set: give the prompts file, e.g. data.path=prompts.jsonl"
        )

    from tqdm.auto import tqdm
    from transformers import set_seed

    from . import modeling

    started = time.time()
    tokenizer = modeling.load_tokenizer(opts.model)
    conversational = tokenizer.chat_template is not None
    inputs, converted, source = read_prompts(opts.data, conversational)
    start = done_rows(opts.output, inputs)
    if start == len(inputs):
        print(f"align: generate: {opts.output} already holds all {len(inputs)} rows of {source}", flush=True)
        return
    if start and not opts.quiet:
        print(f"align: generate: resuming {opts.output} at row {start + 1} of {len(inputs)}", flush=True)
    ids = [prompt_ids(tokenizer, row["prompt"]) for row in converted]
    _, model = load_for_generation(opts.model)
    max_length = context_length(model, overrides, opts.model)
    limit = max_length - opts.max_new_tokens
    long = [i for i in range(start, len(ids)) if len(ids[i]) > limit]
    if long:
        raise AlignError(
            f"{len(long)} prompts are longer than {max_length} - max_new_tokens={opts.max_new_tokens} = {limit} "
            f"tokens (first: row {long[0] + 1}, {len(ids[long[0]])} tokens): shorten them, lower max_new_tokens, "
            "or raise model.max_length if the model takes longer inputs"
        )
    tokenizer.padding_side = "left"
    set_seed(opts.seed)
    config = generation_config(opts, tokenizer, model, opts.num_return_sequences)
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    bar = tqdm(total=len(inputs), initial=start, unit="row", desc="generate", disable=opts.quiet)
    try:
        _generate_rows(opts, tokenizer, model, config, inputs, ids, start, bar)
    except KeyboardInterrupt:
        bar.close()
        err = AlignError(
            f"interrupted: {opts.output} keeps the rows written so far; run the same command to resume"
        )
        err.exit_code = 130  # 128 + SIGINT, as for an interrupted training run
        raise err from None
    bar.close()
    print(
        f"align: generate wrote {len(inputs) - start} rows ({len(inputs)} in all) to {opts.output} "
        f"in {time.time() - started:.1f}s",
        flush=True,
    )


def _generate_rows(opts: GenerateOptions, tokenizer, model, config, inputs, ids, start: int, bar) -> None:
    """Generates rows `start:` in batches, appending each batch to `opts.output` as it is done."""
    import torch

    n = opts.num_return_sequences
    with open(opts.output, "a", encoding="utf-8") as f:
        for s in range(start, len(inputs), opts.batch_size):
            rows = list(range(s, min(s + opts.batch_size, len(inputs))))
            batch = tokenizer.pad({"input_ids": [ids[r] for r in rows]}, return_tensors="pt").to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, generation_config=config)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            lines = []
            for j, r in enumerate(rows):
                answers = texts[j * n : (j + 1) * n]
                extra: dict[str, Any] = {"completion": answers[0]} if n == 1 else {"completions": answers}
                lines.append(json.dumps({**_json_safe(inputs[r]), **extra}, ensure_ascii=False) + "\n")
            f.write("".join(lines))  # one write per batch: an interrupt loses at most this batch
            f.flush()
            bar.update(len(rows))
