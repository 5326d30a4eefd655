"""`align data preview`: the rows the trainer gets, as JSON lines on stdout.

    align data preview method=dpo data.path=my_pairs.jsonl            # first 3 training rows
    align data preview method=sft data.path=chats.jsonl rows=10 rendered=true | jq .

Each line is one training row exactly as the trainer receives it (TRL's field names: `prompt`,
`chosen`, `rejected`, `completion`, `label`, `messages`, `text`, the listwise `completions` in
best-first order, ...) plus `source` (`file:line`). With `rendered=true`, also `rendered`: the
text after the chat template, and `trained`: the part of it the loss is computed on (per
answer for preference and listwise rows), with its token count. Only the rows go to stdout;
warnings and errors go to stderr, so the output pipes into `jq`.
"""

from __future__ import annotations

import json
import sys

from ..errors import AlignError


def split_args(argv: list[str]) -> tuple[list[str], int, bool]:
    """(overrides for composing, rows, rendered) from the command line.

    Raises:
        AlignError: rows= not a positive whole number, rendered= not true/false.
    """
    rest, rows, rendered = [], 3, False
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "rows":
            if not value.isdigit() or int(value) < 1:
                raise AlignError(f"rows={value} must be a whole number of rows, at least 1")
            rows = int(value)
        elif name == "rendered":
            if value.lower() not in ("true", "false", "1", "0"):
                raise AlignError(f"rendered={value} must be true or false")
            rendered = value.lower() in ("true", "1")
        else:
            rest.append(arg)
    return rest, rows, rendered


def _render(messages_or_text, tokenizer, tools=None, generation: bool = False) -> str:
    if isinstance(messages_or_text, str):
        return messages_or_text
    return tokenizer.apply_chat_template(
        messages_or_text, tools=tools, tokenize=False, add_generation_prompt=generation
    )


def _trained_part(prompt, answer, tokenizer, tools=None) -> tuple[str, str, int]:
    """(full text, the trained-on text, its token count) for one prompt and answer, the way
    TRL's trainers split them: the answer's tokens after the prompt's common prefix."""
    if isinstance(prompt, list):
        prompt_text = _render(prompt, tokenizer, tools, generation=True)
        full = _render([*prompt, *answer], tokenizer, tools)
    else:
        prompt_text, full = prompt, prompt + answer + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(p_ids), len(f_ids)) and p_ids[n] == f_ids[n]:
        n += 1
    return full, tokenizer.decode(f_ids[n:]), len(f_ids) - n


def _scored(row: dict, tokenizer) -> dict:
    """A reward model's view: each prompt + answer as its trainer tokenizes it, scored at the end."""
    from ..rewards.model import tokenize_response

    answers = [(k, row[k]) for k in ("completion", "chosen", "rejected") if row.get(k) is not None]
    answers += [(f"completions[{i}]", c) for i, c in enumerate(row.get("completions") or [])]
    rendered = {name: tokenizer.decode(tokenize_response(tokenizer, row["prompt"], a)) for name, a in answers}
    return {
        "rendered": rendered if len(rendered) > 1 else next(iter(rendered.values())),
        "trained": "the reward read at the last token of each rendered text",
    }


def rendered_fields(row: dict, tokenizer, method_args: dict | None = None, method: str = "") -> dict:
    """`rendered` and `trained` (+ `trained_tokens`) for one converted row."""
    if method == "rm":
        return _scored(row, tokenizer)
    tools = json.loads(row["tools"]) if row.get("tools") else None
    args = method_args or {}
    if row.get("messages") is not None:
        full = _render(row["messages"], tokenizer, tools)
        n = len(tokenizer(full, add_special_tokens=False)["input_ids"])
        note = (
            "assistant turns only (method.args.assistant_only_loss=true)"
            if args.get("assistant_only_loss")
            else "all of it (TRL trains every token of a conversation; method.args.assistant_only_loss=true "
            "trains the assistant turns only)"
        )
        return {"rendered": full, "trained": note, "trained_tokens": n}
    if row.get("text") is not None and row.get("prompt") is None:
        full = row["text"] + (tokenizer.eos_token or "")
        return {
            "rendered": full,
            "trained": full,
            "trained_tokens": len(tokenizer(full, add_special_tokens=False)["input_ids"]),
        }
    prompt = row["prompt"]
    answers = [(k, row[k]) for k in ("completion", "chosen", "rejected") if row.get(k) is not None]
    answers += [(f"completions[{i}]", c) for i, c in enumerate(row.get("completions") or [])]
    if not answers:  # prompt data: the policy writes the answers
        return {
            "rendered": _render(prompt, tokenizer, tools, generation=True),
            "trained": "generated answers",
        }
    out: dict = {"rendered": {}, "trained": {}, "trained_tokens": {}}
    for name, answer in answers:
        full, trained, n = _trained_part(prompt, answer, tokenizer, tools)
        out["rendered"][name], out["trained"][name], out["trained_tokens"][name] = full, trained, n
    if len(answers) == 1:  # one answer: plain values, not one-key objects
        out = {k: next(iter(v.values())) for k, v in out.items()}
    return out


def preview(cfg, rows: int, rendered: bool) -> list[dict]:
    """The first `rows` training rows as the trainer gets them, each with its `source`."""
    from .. import modeling
    from ..train import checked_config, read_run_data
    from . import _to_dataset

    module, ctx, data_cfg = checked_config(cfg)
    method, model_cfg = ctx.method, ctx.model_cfg
    tokenizer = modeling.load_tokenizer(model_cfg)
    train, _ = read_run_data(module, ctx, data_cfg, tokenizer).loaded()
    # Through the same Dataset the trainer gets: Arrow gives every row every column.
    dataset = _to_dataset(train.rows[:rows]) if train.rows else []
    out = []
    for i, row in enumerate(dataset):
        line = {"source": train.origins[i], **row}
        if rendered:
            line.update(rendered_fields(row, tokenizer, ctx.args, method["name"]))
        out.append(line)
    return out


def main(argv: list[str]) -> None:
    """Entry for `align data preview [overrides] [rows=N] [rendered=true]`."""
    from .. import config as schema
    from ..preflight import check_repeated_keys, compose_checked
    from ..train import _wants_debug, fail

    try:
        rest, rows, rendered = split_args(list(argv))
        rest = schema.normalize_overrides(rest)
        check_repeated_keys(rest)
        lines = preview(compose_checked(rest), rows, rendered)
    except AlignError as err:
        if _wants_debug(list(argv)):
            raise
        fail(err)
    for line in lines:
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    sys.stdout.flush()
