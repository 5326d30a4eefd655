"""Reward functions for GRPO and PPO, built from the `reward` config group (`conf/reward/`).

The `reward` config maps names to entries; each entry becomes one reward function, and its
name becomes the logged metric `rewards/<name>/mean`:

    reward:
      brevity:                 # any name
        type: length           # length | regex | match | keyword | behaviour | function | model
        target: 40             # the type's options (see rules.py, user.py, model.py)
        weight: 1.0            # weight in the sum GRPO/PPO optimise (default 1.0)

The type may be left out when the name is a type (`length: {target: 40}`), and a bare value
sets a type's main option, so these are the same:

    align train method=ppo reward=model reward.model.path=outputs/rm/run
    align train method=ppo reward=model reward.model=outputs/rm/run

An entry set to null is dropped (`reward.keyword=null` removes it from a mix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import AlignError, nearest
from .base import Reward, message_text

__all__ = ["TYPES", "Reward", "build_reward_functions", "check_columns", "message_text", "row_check"]

# type name -> "module:class"; imported on use so that rule rewards never import torch.
TYPES: dict[str, str] = {
    "length": "align_cli.rewards.rules:LengthReward",
    "regex": "align_cli.rewards.rules:RegexReward",
    "match": "align_cli.rewards.rules:MatchReward",
    "keyword": "align_cli.rewards.rules:KeywordReward",
    "behaviour": "align_cli.rewards.rules:BehaviourReward",
    "function": "align_cli.rewards.user:FunctionReward",
    "model": "align_cli.rewards.model:ModelReward",
}


def _reward_class(type_name: str) -> type[Reward]:
    import importlib

    module, _, cls = TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _resolve(name: str, entry: Any) -> tuple[type[Reward], dict]:
    """The reward class of a config entry and its options (a bare value set as the main one)."""
    if not isinstance(entry, dict):
        entry = {"type": name, "_main": entry}
    entry = dict(entry)
    type_name = entry.pop("type", None) or name
    if type_name not in TYPES:
        raise AlignError(
            f"reward.{name}: unknown reward type '{type_name}'{nearest(str(type_name), TYPES)}; "
            f"set reward.{name}.type to one of: {', '.join(TYPES)}"
        )
    cls = _reward_class(type_name)
    if "_main" in entry:
        entry[cls.main] = entry.pop("_main")
    return cls, entry


def build_reward(name: str, entry: Any) -> tuple[Reward, float]:
    """Builds one reward function and its weight from a config entry."""
    cls, entry = _resolve(name, entry)
    for key, value in entry.items():
        if value == "???":  # a mandatory value the chosen conf/reward file leaves to the user
            raise AlignError(f"reward.{name}.{key} is required: set reward.{name}.{key}=<value>")
    weight = entry.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise AlignError(f"reward.{name}.weight={weight!r} must be a number")
    return cls(name, **entry), float(weight)


def build_reward_functions(reward_cfg: dict | None) -> tuple[list[Callable], list[float]]:
    """Builds the reward functions and their weights from the `reward` config.

    Args:
        reward_cfg: the `reward` config as a plain dict (a DictConfig is converted), mapping
            entry names to entries (see the module docstring).

    Returns:
        `(funcs, weights)`, in config order. Each function has TRL's reward signature
        `f(prompts, completions, **kwargs) -> list[float | None]`, a `__name__` equal to
        its entry name, and (reward models only) a `to(device)` method.

    Raises:
        AlignError: no reward configured, an unknown type or option, a bad value, a user
            function that cannot be imported, or a reward model path that cannot be loaded.
    """
    reward_cfg = _plain(reward_cfg) or {}
    if not isinstance(reward_cfg, dict):
        raise AlignError(f"reward must be a mapping of name -> reward entry, got {reward_cfg!r}")
    funcs: list[Callable] = []
    weights: list[float] = []
    for name, entry in reward_cfg.items():
        if entry is None:
            continue
        func, weight = build_reward(str(name), entry)
        funcs.append(func)
        weights.append(weight)
    if not funcs:
        raise AlignError(
            "no reward configured: choose one with reward=<file in conf/reward/> (e.g. reward=length, "
            "reward=model reward.model.path=<rm run folder>), or add entries such as "
            "+reward.brevity.type=length +reward.brevity.target=40"
        )
    return funcs, weights


def check_columns(funcs: list[Callable], columns: list[str], source: str = "the data") -> None:
    """Fails before training when a reward reads a dataset column the data does not have.

    Args:
        funcs: reward functions from `build_reward_functions`.
        columns: the training dataset's columns.
        source: how to name the data in the message (e.g. its path).

    Raises:
        AlignError: naming the reward, the column and the columns there are.
    """
    for func in funcs:
        for column in getattr(func, "columns", ()):
            if column not in columns:
                name = getattr(func, "__name__", "?")
                extra = sorted(c for c in columns if c != "prompt")
                raise AlignError(
                    f"reward.{name} reads the column '{column}', which {source} does not have; other columns: "
                    f"{', '.join(extra) or '(none)'} (set reward.{name}.column, or add the column to the data)"
                )


def row_check(reward_cfg: dict | None) -> Callable[[dict], str | None] | None:
    """A check of one data row against the rewards that depend on column values, or None.

    The data layer runs it on every converted row, so a value that would stop training at
    some step (e.g. an `answer` without a number for `match` in numeric mode) is reported
    with its file and line before any model loads. Only rewards that check rows are built
    here (rule rewards, cheap); reward models and user functions are not.

    Args:
        reward_cfg: the `reward` config (see the module docstring); None or empty: no check.

    Returns:
        `check(row) -> message | None` (the first problem of the row), or None when no
        configured reward checks rows.

    Raises:
        AlignError: an unknown reward type or a bad option of a reward that checks rows.
    """
    reward_cfg = _plain(reward_cfg) or {}
    if not isinstance(reward_cfg, dict):
        return None  # build_reward_functions says what is wrong with it
    checkers = []
    for name, entry in reward_cfg.items():
        if entry is None:
            continue
        cls, _ = _resolve(str(name), entry)
        if cls.row_problem is not Reward.row_problem:
            checkers.append(build_reward(str(name), entry)[0])
    if not checkers:
        return None

    def check(row: dict) -> str | None:
        for reward in checkers:
            problem = reward.row_problem(row)
            if problem:
                return problem
        return None

    return check


def rewards_for(
    method: str, reward_cfg: dict | None, columns: list[str]
) -> tuple[list[Callable], list[float]]:
    """The reward functions and weights of a run of `method` (ppo, grpo), checked against its data.

    The data's values were checked as it was read (`row_check`, with file:line); here the
    columns the rewards read are checked against the columns the data has.

    Raises:
        AlignError: the run has no reward, one of the rewards cannot be built, or one reads a
            column the training data does not have.
    """
    if not reward_cfg:
        raise AlignError(
            f"method={method} needs a reward: add reward=length (or keyword, match, format, function, mix), or "
            "reward=model reward.model.path=<rm run folder>; see conf/reward/"
        )
    funcs, weights = build_reward_functions(reward_cfg)
    check_columns(funcs, columns, "the training data")
    return funcs, weights
