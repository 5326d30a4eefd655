"""`align data validate`: check a dataset for a method without training.

    align data validate method=kto data.path=my_feedback.jsonl
    align data validate method=dpo data=ultrafeedback model=qwen2.5-0.5b

The config is composed exactly as `align train` composes it (same groups, same overrides),
then the whole dataset is read and converted to the method's format with the same code
`align train` runs before loading a model. Every problem is listed with its file and line
(up to a cap; all are counted), followed by a summary per split: rows, columns, the detected
input format, token-length percentiles of prompts and answers with the model's tokenizer.
Exits 0 when the data is ready to train on, 1 otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omegaconf import DictConfig

from . import config as schema
from .errors import AlignError


@dataclass
class SplitReport:
    """What was found in one split (`train`, or the `data.eval_split`)."""

    split: str
    source: str = ""
    rows_read: int = 0
    rows_valid: int = 0
    columns: list[str] = field(default_factory=list)
    input_format: str | None = None
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # field -> {p50, p90, p99, max}
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first MAX_LISTED
    problem_count: int = 0


@dataclass
class Report:
    """The result of `align data validate`."""

    method: str
    standard: str
    model: str
    max_length: int
    splits: list[SplitReport] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # the method's settings and what they need

    @property
    def ok(self) -> bool:
        return not self.settings and all(s.problem_count == 0 for s in self.splits)

    def render(self) -> str:
        lines = [
            f"align data validate: method={self.method} takes {self.standard} data; "
            f"tokens counted with model {self.model} (max_length={self.max_length})"
        ]
        for s in self.splits:
            lines.append(f"{s.split}: {s.source}")
            if s.rows_read:
                lines.append(f"  rows     {s.rows_read} read, {s.rows_valid} valid")
            if s.input_format:
                lines.append(f"  format   {s.input_format}  (columns: {', '.join(s.columns)})")
            if s.lengths:
                lines.append(f"  tokens   {'':<12}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
                for name, stats in s.lengths.items():
                    cells = "".join(f"{stats[k]:>7}" for k in ("p50", "p90", "p99", "max"))
                    lines.append(f"           {name:<12}{cells}")
            lines += [f"  {note}" for note in s.notes]
            if s.problem_count:
                lines.append(f"  problems ({s.problem_count}):")
                lines += [f"    {p}" for p in s.problems]
                if s.problem_count > len(s.problems):
                    lines.append(f"    ... and {s.problem_count - len(s.problems)} more")
        if self.settings:
            lines.append(f"settings: problems ({len(self.settings)}):")
            lines += [f"    {p}" for p in self.settings]
        return "\n".join(lines)


def _notes(rows: list[dict], standard: str, lengths, max_length: int) -> list[str]:
    """Per-format facts worth a glance: label balance, score range, list sizes, truncation."""
    notes = []
    over = sum(1 for n in lengths.longest if n > max_length)
    if over:
        notes.append(
            f"{over} of {len(rows)} rows are longer than max_length={max_length} with their longest "
            "answer; the trainer truncates them"
        )
    if standard == "kto":
        good = sum(1 for r in rows if r["label"])
        notes.append(f"labels   {good} desirable (true), {len(rows) - good} undesirable (false)")
        if good == 0 or good == len(rows):
            notes.append("note: KTO learns from both kinds; this data has only one")
    elif standard == "pointwise":
        scores = [r["score"] for r in rows]
        notes.append(
            f"score    min {min(scores):.4g}, mean {sum(scores) / len(scores):.4g}, max {max(scores):.4g}"
        )
    elif standard == "listwise":
        sizes = [len(r["completions"]) for r in rows]
        notes.append(f"ranked   {min(sizes)} to {max(sizes)} completions per prompt")
    elif standard == "preference":
        with_margin = sum(1 for r in rows if "margin" in r)
        if with_margin:
            notes.append(f"margin   given in {with_margin} of {len(rows)} rows")
    elif standard == "prompt":
        extra = sorted({k for r in rows for k in r} - {"prompt"})
        if extra:
            notes.append(f"kept     {', '.join(extra)} (passed to reward functions)")
    return notes


def split_report(
    loaded,
    problems,
    method: dict,
    tokenizer,
    max_length: int,
    source: str,
    evaluation: bool = False,
    held: list[int] | None = None,
    eval_ratio: float = 0.0,
) -> SplitReport:
    """What `read_splits` found in one split, measured for the report (no check is made here:
    every check lives in `read_splits` and the method's `check`, which `align train` runs too).

    Args:
        loaded: the split as read (`Loaded`), or None when nothing was readable.
        problems: the split's `Problems`.
        source: what the split reads, for the report when nothing was readable.
        held: the training rows `data.eval_ratio` holds out (None: evaluation reads its own rows).
    """
    from .data.lengths import measure, percentiles

    standard = method["dataset_type"]
    report = SplitReport(split="eval" if evaluation else "train", source=source)
    if loaded is not None:
        report.source = loaded.source
        report.rows_read, report.rows_valid = loaded.rows_read, len(loaded.rows)
        report.columns = loaded.columns
        report.input_format = loaded.input_format.name if loaded.input_format else None
        if len(set(loaded.formats)) > 1:  # several files, each in its own layout
            report.input_format = " + ".join(loaded.formats)
        if loaded.rows:
            lengths = measure(loaded.rows, standard, tokenizer)
            report.lengths = {"prompt": percentiles(lengths.prompt)}
            report.lengths.update({name: percentiles(v) for name, v in lengths.answers.items()})
            report.notes = _notes(loaded.rows, standard, lengths, max_length)
            report.notes += [f"warning: {w}" for w in loaded.warnings]  # e.g. what data.too_long did
            if held is not None:
                report.notes.append(_held_out_note(loaded.rows, held, eval_ratio))
        elif not problems:
            problems.add(f"{loaded.source}: the dataset is empty")
    # Reading and converting find problems in two passes: list them in file order.
    report.problems, report.problem_count = sorted(problems.items, key=_position), problems.total
    return report


def _held_out_note(rows: list[dict], held: list[int], ratio: float) -> str:
    """What `data.eval_ratio` will hold out for evaluation, in rows and prompts."""
    from .data.holdout import prompt_key

    if not held:
        return f"held out nothing for evaluation (data.eval_ratio={ratio})"
    prompts = len({prompt_key(rows[i]) or i for i in held})
    return (
        f"held out {len(held)} of {len(rows)} rows ({prompts} prompt{'s' if prompts != 1 else ''}, "
        f"none also in training) for evaluation (data.eval_ratio={ratio})"
    )


def _position(problem: str) -> tuple[str, int]:
    """(file, line) of a `file:line: ...` problem, for sorting; problems without one go last."""
    match = re.match(r"^(.*?):(?:row )?(\d+):", problem)
    return (match.group(1), int(match.group(2))) if match else ("\uffff", 0)


def validate(cfg: DictConfig) -> Report:
    """Checks the configured dataset for the configured method: every check `align train` makes
    before loading weights (the same functions), collecting each problem instead of stopping.

    Raises:
        AlignError: the config itself is wrong (no method, a model whose tokenizer cannot load).
    """
    from .data.convert import data_path
    from .data.holdout import has_eval_source
    from .data.problems import Problems
    from .run_checks import checked_config, checked_run_data

    # The same checks as `align train`: what validate calls ready, train accepts.
    module, ctx, data_cfg = checked_config(cfg)
    method, model_cfg = ctx.method, ctx.model_cfg
    report = Report(method["name"], method["dataset_type"], model_cfg.name_or_path, model_cfg.max_length)
    found = (Problems(), Problems())
    tokenizer, splits, report.settings = checked_run_data(module, ctx, data_cfg, problems=found)
    try:
        source = data_path(data_cfg, method.get("sample"))
    except AlignError:
        source = "(no data.path)"
    held = None if has_eval_source(data_cfg) else splits.held
    report.splits.append(
        split_report(
            splits.train,
            found[0],
            method,
            tokenizer,
            model_cfg.max_length,
            source,
            held=held,
            eval_ratio=data_cfg.eval_ratio,
        )
    )
    if has_eval_source(data_cfg):
        report.splits.append(
            split_report(
                splits.evaluation,
                found[1],
                method,
                tokenizer,
                model_cfg.max_length,
                data_cfg.eval_path or source,
                evaluation=True,
            )
        )
    return report


def main(argv: list[str]) -> None:
    """Entry for `align data validate [overrides]`: prints the report, exits 0 (valid) or 1."""
    from .compose import check_repeated_keys, compose_checked
    from .errors import fail, wants_debug

    argv = schema.normalize_overrides(list(argv))
    try:
        check_repeated_keys(argv)
        report = validate(compose_checked(argv))
    except AlignError as err:
        if wants_debug(argv):
            raise
        fail(err)
    print(report.render(), flush=True)
    count = sum(s.problem_count for s in report.splits) + len(report.settings)
    if count:
        sources = list(dict.fromkeys(s.source for s in report.splits if s.problem_count))
        sources += ["the settings"] if report.settings else []
        fail(f"{count} problem{'s' if count > 1 else ''} in {' and '.join(sources)} (listed above)")
    rows = sum(s.rows_valid for s in report.splits)
    formats = ", ".join(dict.fromkeys(s.input_format for s in report.splits if s.input_format))
    print(f"align: ok: {rows} rows of {report.standard} data ({formats}), ready for method={report.method}")
