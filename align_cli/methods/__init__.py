"""The method registry: `method=<name>` -> the module whose `build(ctx)` returns a trainer.

Each module declares `Settings`, the dataclass of its own `method.<key>` settings with their
defaults (a subclass of `config.MethodSettings`); config.register() stores it as Hydra's
`method/schema/<name>`, which conf/method/<name>.yaml extends. Importing a method module is cheap
(torch, transformers and TRL are imported inside its functions), so composing reads them.

A module may also define `check(ctx, rows) -> list[str]`: every check of its settings and data
that needs no model weights (`method_problems` runs it for train and validate alike).

An explicit table of import strings, so `align --help` imports nothing heavy and a reader
sees every method in one place. `tests/test_config.py` checks it matches conf/method/*.yaml.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..data.fit import PromptRoom
from ..errors import AlignError

REGISTRY: dict[str, str] = {
    "sft": "align_cli.methods.sft",
    "rm": "align_cli.methods.rm",
    "ppo": "align_cli.methods.ppo",
    "dpo": "align_cli.methods.dpo",
    "kto": "align_cli.methods.kto",
    "grpo": "align_cli.methods.grpo",
}


def load_method(name: str) -> ModuleType:
    """Imports a method module by its registry name."""
    if name not in REGISTRY:
        raise AlignError(f"unknown method '{name}': choose one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def settings_class(name: str) -> type:
    """The settings dataclass of a method (`Settings` of its module)."""
    return load_method(name).Settings


def prompt_room(module: ModuleType, args: dict, model_cfg) -> PromptRoom | None:
    """The most tokens a prompt may have for this method: a method's own `prompt_room(args,
    model_cfg)` (PPO keeps room for its sampled response; None: no limit), else model.max_length
    less one token for the answer."""
    own = getattr(module, "prompt_room", None)
    if own is not None:
        return own(args, model_cfg)
    return PromptRoom.for_answer(model_cfg.max_length)


def method_problems(module: ModuleType, ctx, rows: list[dict] | None) -> list[str]:
    """Everything a method's own `check(ctx, rows)` finds wrong with its settings and (given the
    converted training rows; None when none were readable) with the data it needs, without
    loading weights. `align train` stops on these before loading a model; `align data validate`
    lists them, so it says "ready" only when train would start."""
    check = getattr(module, "check", None)
    return list(check(ctx, rows)) if check is not None else []
