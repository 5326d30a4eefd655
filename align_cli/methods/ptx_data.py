"""The demonstrations of the PPO-ptx loss (`data.ptx_path`, weighted by `method.args.ptx_coef`).

PPO (align_cli/ppo/ptx.py) and GRPO (methods/grpo.py) add ptx_coef x the policy's language-model
loss on them to every optimiser step (InstructGPT's pretraining mix). They are read like
`data.path` (any SFT layout: instruction/output, messages, prompt/completion, ...; a file,
folder, hub id or a list), all of them, with no held-out part, and checked with the rest
of the run before anything loads (`align data validate` reports their bad rows too).
"""

from __future__ import annotations

import dataclasses
import logging

from ..errors import AlignError

log = logging.getLogger("align")

# The methods whose trainer adds the ptx loss.
PTX_METHODS = ("ppo", "grpo")
# The data keys that say how a file is read: data.ptx_<key> reads data.ptx_path as data.<key> reads
# data.path; the pipeline's `ptx: <sft stage>` wire copies that stage's values.
PTX_READ_KEYS = ("format", "columns", "subset", "split", "dataset")


def ptx_data_config(data_cfg):
    """The `data` config that reads `data.ptx_path`: all of it, with no held-out part."""
    return dataclasses.replace(
        data_cfg,
        path=data_cfg.ptx_path,
        eval_path=None,
        eval_split=None,
        eval_ratio=0.0,
        max_samples=None,
        columns=dict(data_cfg.ptx_columns),
        format=data_cfg.ptx_format,
        subset=data_cfg.ptx_subset,
        split=data_cfg.ptx_split,
        dataset=data_cfg.ptx_dataset,
        ptx_path=None,
    )


def read_ptx(data_cfg, conversational: bool, problems=None):
    """The ptx demonstrations in the SFT standard (prompt/completion), every bad row named by file:line."""
    from ..data.convert import read_and_convert

    return read_and_convert(ptx_data_config(data_cfg), "sft", conversational, problems=problems)


def ptx_read_keys_set(data_cfg) -> list[str]:
    """The data.ptx_<key> settings (how data.ptx_path is read) given other values than their defaults."""
    from ..config import DataConfig

    defaults = DataConfig()
    return [
        f"data.ptx_{key}"
        for key in PTX_READ_KEYS
        if getattr(data_cfg, f"ptx_{key}") != getattr(defaults, f"ptx_{key}")
    ]


def _as_ptx(message: str) -> str:
    """A data reader's message about data.path's read keys, as the data.ptx_* keys the user set."""
    for key in PTX_READ_KEYS:
        message = message.replace(f"data.{key}.", f"data.ptx_{key}.").replace(
            f"data.{key}=", f"data.ptx_{key}="
        )
    return message


def _conversational(ctx) -> bool:
    """Whether the demonstrations become chat messages: the policy's tokenizer has a chat template."""
    return getattr(ctx.tokenizer, "chat_template", None) is not None


def ptx_problems(ctx) -> list[str]:
    """What is wrong with the PPO-ptx settings (method.args.ptx_coef, data.ptx_path), reading the data."""
    coef = float(getattr(ctx.config, "ptx_coef", 0.0) or 0.0)
    path = ctx.data_cfg.ptx_path if ctx.data_cfg is not None else None
    unread = ptx_read_keys_set(ctx.data_cfg) if ctx.data_cfg is not None and path is None else []
    if unread:
        return [
            f"{unread[0]} says how data.ptx_path is read, but data.ptx_path is not set: set both or neither"
        ]
    if coef > 0 and path is None:
        return [
            f"method.args.ptx_coef={coef} weighs a language-model loss on demonstrations: give them with "
            "data.ptx_path=<sft data> (or set method.args.ptx_coef=0)"
        ]
    if path is None:
        return []
    if coef == 0:
        log.warning("data.ptx_path is set but method.args.ptx_coef is 0: the ptx data is not used")
        return []
    from ..data.problems import Problems

    found = Problems()
    try:
        loaded = read_ptx(ctx.data_cfg, _conversational(ctx), problems=found)
    except AlignError as err:
        return [_as_ptx(f"data.ptx_path: {err}")]
    out = [_as_ptx(f"data.ptx_path: {line}") for line in found.items]
    if not out:
        ctx.ptx_read = (_conversational(ctx), loaded)  # read once: the build trains on these rows
    if not out and not [r for r in loaded.rows if "completion" in r]:
        out.append(
            f"data.ptx_path: {loaded.source} holds no prompt/completion demonstrations (e.g. instruction/output)"
        )
    return out


def ptx_dataset(ctx, args):
    """The ptx demonstrations as a dataset, or None when the ptx loss is off."""
    if not args.ptx_coef or ctx.data_cfg is None or ctx.data_cfg.ptx_path is None:
        return None
    from ..data import _to_dataset

    conversational, loaded = ctx.ptx_read or (None, None)
    ctx.ptx_read = None  # the dataset below holds the rows from here on
    if loaded is None or conversational != _conversational(ctx):
        loaded = read_ptx(ctx.data_cfg, _conversational(ctx))
    log.info("ptx: %d demonstrations from %s, ptx_coef %s", len(loaded.rows), loaded.source, args.ptx_coef)
    return _to_dataset(loaded.rows)


def ptx_override(sft_cfg, stage: str) -> list[str]:
    """`++data.ptx_path=...` for a pipeline stage wired to an sft stage's data (`inputs: {ptx: <stage>}`):
    that stage's data.path (or its method's sample file when it has none), read as that stage reads
    it (its data.format, columns, subset, split and dataset become data.ptx_*)."""
    from omegaconf import OmegaConf

    from ..compose import quote_value
    from ..config import DataConfig
    from ..data.convert import data_path

    data = OmegaConf.to_container(sft_cfg.data, resolve=True)
    path = data_path(DataConfig(path=data["path"]), sft_cfg.method.get("sample"))
    if isinstance(path, str):
        out = [f"++data.ptx_path={quote_value(path)}"]
    elif isinstance(path, list) and all(isinstance(p, str) for p in path):
        out = [f"++data.ptx_path=[{','.join(quote_value(p) for p in path)}]"]
    else:
        raise AlignError(
            f"stage {stage}'s data.path is not a path or a list of paths, so it cannot be wired in as ptx "
            "data: give the ptx stage's data.ptx_path yourself"
        )
    defaults = DataConfig()
    for key in PTX_READ_KEYS:
        value = data.get(key)
        if value == getattr(defaults, key):
            continue
        if key == "columns":
            out += [f"++data.ptx_columns.{ours}={quote_value(str(yours))}" for ours, yours in value.items()]
        else:
            out.append(f"++data.ptx_{key}={quote_value(str(value))}")
    return out
