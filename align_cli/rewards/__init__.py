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

`reward.timeout` (not an entry) is how many seconds one call of a reward (one batch) may
take, 300 by default (null: no limit): a reward that hangs, calls sys.exit, or returns no
finite value for a whole batch stops the run with a message naming it, after saving the
last step's state; a few NaN/inf values are dropped and counted (`rewards/<name>/non_finite`).
The built-in rules (rules.py) run on the training thread, and the limit is checked between
completions; user functions and reward models run in a watchdog thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import AlignError, nearest
from .base import DEFAULT_TIMEOUT, Reward, RewardFailed, message_text

__all__ = [
    "TYPES",
    "Reward",
    "build_reward_functions",
    "check_columns",
    "message_text",
    "RewardFailed",
    "reward_model_names",
    "reward_model_path",
    "reward_problems",
    "reward_timeout",
    "row_check",
]

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


def _entries(reward_cfg: Any) -> dict:
    """The reward entries of a `reward` config: every key but `timeout` (a setting of them all)."""
    return (
        {k: v for k, v in reward_cfg.items() if k != "timeout"}
        if isinstance(reward_cfg, dict)
        else reward_cfg
    )


def reward_timeout(reward_cfg: Any) -> float | None:
    """`reward.timeout`: the seconds one reward call may take (default `DEFAULT_TIMEOUT`; null or
    0: no limit).

    Raises:
        AlignError: a value that is not a non-negative number.
    """
    value = (
        _plain(reward_cfg).get("timeout", DEFAULT_TIMEOUT) if isinstance(_plain(reward_cfg), dict) else None
    )
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise AlignError(
            f"reward.timeout={value!r} must be a number of seconds (e.g. 300), or null for no limit"
        )
    return float(value) or None


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


def _options(name: str, entry: Any) -> tuple[type[Reward], dict, float]:
    """The reward class of a config entry, its options and its weight, checked."""
    cls, entry = _resolve(name, entry)
    for key, value in entry.items():
        if value == "???":  # a mandatory value the chosen conf/reward file leaves to the user
            raise AlignError(f"reward.{name}.{key} is required: set reward.{name}.{key}=<value>")
    weight = entry.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise AlignError(f"reward.{name}.weight={weight!r} must be a number")
    return cls, entry, float(weight)


def build_reward(name: str, entry: Any) -> tuple[Reward, float]:
    """Builds one reward function and its weight from a config entry."""
    cls, options, weight = _options(name, entry)
    return cls(name, **options), weight


def reward_problems(method: str, reward_cfg: dict | None, columns: list[str] | None) -> list[str]:
    """Everything wrong with a run's rewards that shows without loading a model's weights.

    Rule rewards and user functions are built (cheap: an import); a reward model's entry is
    checked through its options, path and config (`model.check_entry`). With `columns` (the
    training data's), every column a reward reads must be one of them. `align train` and
    `align data validate` both call this, so validate says "ready" only when train would start.

    Returns:
        One message per problem (empty when the rewards are fine).
    """
    if not reward_cfg:
        return [
            f"method={method} needs a reward: add reward=length (or keyword, match, format, function, mix), or "
            "reward=model reward.model.path=<rm run folder>; see conf/reward/"
        ]
    reward_cfg = _plain(reward_cfg)
    if not isinstance(reward_cfg, dict):
        return [f"reward must be a mapping of name -> reward entry, got {reward_cfg!r}"]
    problems: list[str] = []
    try:
        reward_timeout(reward_cfg)
    except AlignError as err:
        problems.append(str(err))
    funcs: list[Reward] = []
    configured = 0
    for name, entry in _entries(reward_cfg).items():
        if entry is None:
            continue
        configured += 1
        try:
            cls, options, _ = _options(str(name), entry)
            if cls.type == "model":
                from .model import check_entry

                check_entry(str(name), options)
            else:
                funcs.append(cls(str(name), **options))
        except AlignError as err:
            problems.append(str(err))
    if not configured:
        try:
            build_reward_functions(reward_cfg)
        except AlignError as err:
            problems.append(str(err))
    if columns is not None:
        problems += column_problems(funcs, columns, "the training data")
    return problems


def reward_model_names(reward_cfg: dict | None) -> list[str]:
    """The names of the reward-model entries of a `reward` config (no model is loaded)."""
    reward_cfg = _plain(reward_cfg) or {}
    names = []
    for name, entry in _entries(reward_cfg).items() if isinstance(reward_cfg, dict) else ():
        if entry is not None:
            try:
                if _resolve(str(name), entry)[0].type == "model":
                    names.append(str(name))
            except AlignError:
                pass  # reward_problems names it
    return names


def reward_model_path(reward_cfg: dict | None, name: str) -> str | None:
    """The `path` of the reward-model entry `name` (no model is loaded), or None."""
    entry = _entries(_plain(reward_cfg) or {}).get(name)
    try:
        _, options = _resolve(name, entry)
    except AlignError:
        return None
    return str(options["path"]) if options.get("path") not in (None, "???") else None


def set_entry_option(reward_cfg: dict | None, name: str, key: str, value: Any) -> dict:
    """A copy of the `reward` config whose entry `name` has option `key` set to `value`."""
    import copy

    reward_cfg = copy.deepcopy(_plain(reward_cfg) or {})
    cls, options = _resolve(name, reward_cfg[name])
    reward_cfg[name] = {"type": cls.type, **options, key: value}
    return reward_cfg


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
    timeout = reward_timeout(reward_cfg)
    for name, entry in _entries(reward_cfg).items():
        if entry is None:
            continue
        func, weight = build_reward(str(name), entry)
        func.timeout = timeout
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
    problems = column_problems(funcs, columns, source)
    if problems:
        raise AlignError(problems[0])


def column_problems(funcs: list[Callable], columns: list[str], source: str = "the data") -> list[str]:
    """One message per dataset column a reward reads that the data does not have (see `check_columns`)."""
    problems = []
    for func in funcs:
        for column in getattr(func, "columns", ()):
            if column not in columns:
                name = getattr(func, "__name__", "?")
                extra = sorted(c for c in columns if c != "prompt")
                problems.append(
                    f"reward.{name} reads the column '{column}', which {source} does not have; other columns: "
                    f"{', '.join(extra) or '(none)'} (set reward.{name}.column, or add the column to the data)"
                )
    return problems


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
    for name, entry in _entries(reward_cfg).items():
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
