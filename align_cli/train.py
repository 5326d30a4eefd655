"""`align train`: compose the config with Hydra, then config -> data -> model -> trainer -> run folder.

`train(cfg)` is the whole job and knows no method's details: the method module named by
`method.name` builds the trainer from a `MethodContext`. Tests call `train(cfg)` directly on
configs made with `align_cli.testing.compose`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .errors import AlignError

log = logging.getLogger("align")

schema.register()


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: Any = None


def typed(cfg: DictConfig, key: str, cls: type):
    """Converts one config group to its dataclass (DictConfig stops here)."""
    node = cfg.get(key)
    if node is None:
        return cls()
    return cls(**OmegaConf.to_container(node, resolve=True))


def resolve_output_dir(cfg: DictConfig) -> str:
    if cfg.get("output_dir"):
        return str(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _last_logged(history: list[dict], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


def summarize(trainer, summary_keys: list[str], final_eval: dict[str, float]) -> dict[str, float]:
    """Final train loss and the method's key metrics (last logged values, then the final eval)."""
    history = trainer.state.log_history
    out: dict[str, float] = {}
    train_losses = [e["loss"] for e in history if "loss" in e]
    if train_losses:
        out["train_loss_first"] = float(train_losses[0])
        out["train_loss"] = float(train_losses[-1])
    for key in summary_keys:
        value = final_eval.get(key, _last_logged(history, key))
        if value is not None:
            out[key] = float(value)
    for key, value in final_eval.items():
        if isinstance(value, (int, float)) and key not in out:
            out[key] = float(value)
    out["global_step"] = float(trainer.state.global_step)
    return out


def print_summary(
    method: str, output_dir: str, metrics: dict[str, float], keys: list[str], seconds: float
) -> None:
    """Prints the final loss and the method's key metrics (summary.json holds them all)."""
    wanted = ["train_loss_first", "train_loss", *keys, "eval_loss", "global_step"]
    shown = {k: metrics[k] for k in dict.fromkeys(wanted) if k in metrics}
    lines = [f"align: {method} finished in {seconds:.1f}s -> {output_dir}"]
    lines += [f"  {k:<32} {v:.4g}" for k, v in shown.items()]
    print("\n".join(lines), flush=True)


def train(cfg: DictConfig) -> RunResult:
    """Runs one training job described by a composed config."""
    from . import modeling
    from .callbacks import MetricsFileCallback, plot_metrics
    from .data import load_datasets
    from .methods import load_method
    from .methods.base import MethodContext

    started = time.time()
    method = OmegaConf.to_container(cfg.method, resolve=True) if cfg.get("method") else None
    if not method or "name" not in method:
        raise AlignError("no method chosen: add method=<sft|rm|ppo|dpo|kto|grpo>")
    args = method.pop("args", None) or {}
    module = load_method(method["name"])
    model_cfg = typed(cfg, "model", schema.ModelConfig)
    data_cfg = typed(cfg, "data", schema.DataConfig)
    peft_cfg = typed(cfg, "peft", schema.PeftSettings)
    quant_cfg = typed(cfg, "quant", schema.QuantConfig)
    reward = OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") is not None else None
    output_dir = resolve_output_dir(cfg)
    if os.path.exists(os.path.join(output_dir, "summary.json")):
        raise AlignError(f"{output_dir} holds a finished run; choose another output_dir")

    # The tokenizer is cheap and decides whether prompts become chat messages; the data is
    # read and checked completely before any model weights are loaded.
    tokenizer = modeling.load_tokenizer(model_cfg)
    train_ds, eval_ds = load_datasets(
        data_cfg,
        method["format"],
        conversational=tokenizer.chat_template is not None,
        seed=int(cfg.seed),
        sample=method.get("sample"),
    )
    log.info("data: %d train rows, %d eval rows", len(train_ds), len(eval_ds) if eval_ds is not None else 0)

    from transformers import set_seed

    set_seed(int(cfg.seed))
    os.makedirs(output_dir, exist_ok=True)
    ctx = MethodContext(
        method=method,
        args=args,
        model_cfg=model_cfg,
        quant_cfg=quant_cfg,
        peft_cfg=peft_cfg,
        tokenizer=tokenizer,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        reward=reward,
        output_dir=output_dir,
        callbacks=[MetricsFileCallback(os.path.join(output_dir, "metrics.jsonl"))],
        seed=int(cfg.seed),
    )
    trainer = module.build(ctx)
    trainer.train()
    final_eval = trainer.evaluate() if eval_ds is not None else {}

    # The model (or adapter) and tokenizer go to the run folder's root, so the folder itself is
    # what `model.name_or_path=<run folder>` or from_pretrained(<run folder>) takes.
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        keys = getattr(module, "SUMMARY_KEYS", [])
        metrics = summarize(trainer, keys, final_eval)
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"method": method["name"], "metrics": metrics}, f, indent=2)
        if cfg.get("plot", True):
            plot_metrics(Path(output_dir) / "metrics.jsonl", Path(output_dir) / "training_curves.png", keys)
        print_summary(method["name"], output_dir, metrics, keys, time.time() - started)
    else:
        metrics = {}
    return RunResult(output_dir=output_dir, metrics=metrics, trainer=trainer)


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(schema.CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        debug = bool(cfg.get("debug", False))
        try:
            train(cfg)
        except AlignError as err:
            if debug:
                raise
            print(f"align: error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)

    _main()


def main(argv: list[str]) -> None:
    """Entry for `align train ...`: Hydra reads the overrides from sys.argv."""
    if {"--help", "-h"} & set(argv) and not any(a.startswith("method=") for a in argv):
        # Help composes the config, and `method` has no default: show it for the demo's method.
        argv = [*argv, "method=dpo"]
    sys.argv = ["align train", *schema.normalize_overrides(argv)]
    _hydra_entry()
