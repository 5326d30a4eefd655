"""What every reward has in common: TRL's call signature, a name, and option checking.

A reward is a callable `f(prompts, completions, **kwargs) -> list[float | None]`, the
signature TRL's `GRPOTrainer` calls reward functions with, and the one our PPO loop uses:

- `prompts[i]` is a string, or a list of `{"role", "content"}` messages (conversational data);
- `completions[i]` is a string, or `[{"role": "assistant", "content": ...}]`;
- `kwargs` holds every extra dataset column as a list aligned with `completions` (e.g.
  `answer=[...]`), plus TRL's extras (`completion_ids`, `trainer_state`, `log_metric`, ...).

`None` means "this reward does not apply to this row"; TRL leaves it out of the group statistics.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from ..errors import AlignError, nearest

# Keyword arguments TRL adds beside the dataset columns; not data, so never listed as columns.
TRL_EXTRA_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


# `reward.timeout`: the seconds one reward call (one batch) may take. Generous for a reward
# model on a CPU or a user function that calls a service, short enough that a hung one does
# not hold a run (and a stop request) forever.
DEFAULT_TIMEOUT = 300.0


class RewardFailed(AlignError):
    """A reward could not score a batch (hung, exited, nothing finite). The model has not been
    updated with that batch, so the run saves the state of its last step before it stops."""


def _reraise(err: BaseException):
    raise err


def _content(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def message_text(item: Any) -> str:
    """The plain text of a prompt or completion, plain or conversational.

    A completion (messages from the assistant only, with tool results between its turns) is
    the content of the assistant turns, joined: what rule rewards score. A conversation with
    anyone else's turns in it (a prompt) keeps every turn, so a reader without a chat template
    still sees the question: one turn is its content, several are `Role: content` paragraphs,
    e.g. `User: q1\n\nAssistant: a1\n\nUser: q2`.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return _content(item)
    if isinstance(item, list):
        messages = [m for m in item if isinstance(m, dict)]
        roles = [str(m.get("role", "assistant")) for m in messages]
        if any(r not in ("assistant", "tool") for r in roles):
            if len(messages) == 1:
                return _content(messages[0])
            return "\n\n".join(
                f"{r.capitalize()}: {_content(m)}" for r, m in zip(roles, messages, strict=True)
            )
        turns = [m for m, r in zip(messages, roles, strict=True) if r == "assistant"]
        return "\n".join(_content(m) for m in (turns or messages))
    return "" if item is None else str(item)


def data_columns(kwargs: dict) -> list[str]:
    """The dataset columns among a reward call's keyword arguments."""
    return sorted(k for k in kwargs if k not in TRL_EXTRA_KWARGS)


class Reward:
    """Base class of the built-in rewards.

    Subclasses set `type` (the name used in `reward.<name>.type`), `options` (option name ->
    default; `...` marks a required option) and `main` (the option a bare value sets, so that
    `reward.length=40` means `reward.length.target=40`), and implement `score`. `columns`
    names the dataset columns a reward reads, so a missing one fails before training.

    The instance's `__name__` is the entry's name in the config, which TRL uses to name the
    logged metrics (`rewards/<name>/mean`).
    """

    type: str = ""
    main: str = ""
    options: dict[str, Any] = {}
    columns: tuple[str, ...] = ()  # dataset columns the reward reads (checked before training)

    def __init__(self, name: str, **options: Any) -> None:
        self.__name__ = name
        self.name = name
        unknown = [key for key in options if key not in self.options]
        if unknown:
            raise AlignError(
                f"reward.{name}.{unknown[0]} is not an option of a '{self.type}' reward"
                f"{nearest(unknown[0], self.options)}; valid options: {', '.join(sorted(self.options))}, weight"
            )
        for key, default in self.options.items():
            if key not in options and default is ...:
                raise AlignError(f"reward.{name}.{key} is required for a '{self.type}' reward")
            setattr(self, key, options.get(key, default))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({self.name!r}, {shown})"

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        """Scores one completion's text; `row` holds that row's dataset columns."""
        raise NotImplementedError

    def row_problem(self, row: dict[str, Any]) -> str | None:
        """What in one dataset row would make this reward fail mid-training, or None.

        Called on every converted row before any model loads (`align data validate` lists
        them all), so a bad value is reported with its file and line instead of at some step.
        Subclasses whose scores depend on column values override it.
        """
        return None

    timeout: float | None = DEFAULT_TIMEOUT  # seconds one call may take (`reward.timeout`; None: no limit)
    # align's own rules (rules.py) set this: they run on the calling thread, and `timeout` is
    # checked between completions (`compute`). A watchdog thread costs a hand-off per call (about
    # a tenth of a millisecond, ~0.2 % of a GRPO step of the tiny model) and could not stop a
    # rule sooner: the `re` engine holds the interpreter lock while it matches one text, so the
    # waiting thread only wakes between matches too.
    runs_inline: bool = False
    _deadline: float | None = None  # time.monotonic() by which an inline call must end
    dropped: int = 0  # non-finite values dropped so far

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        """Scores a batch (TRL's signature) through `compute`, guarded: a call that runs past
        `timeout` or calls sys.exit stops the run naming this reward; non-finite values are
        dropped (None) and counted in the metric `rewards/<name>/non_finite` (the total so far,
        logged from the first one on), and a batch with
        no finite value at all stops the run (every update would rest on nothing)."""
        values = list(self._call_guarded(lambda: self.compute(prompts, completions, **kwargs)))
        bad = [
            i
            for i, v in enumerate(values)
            if v is not None and isinstance(v, (int, float)) and not math.isfinite(float(v))
        ]
        if bad:
            shown = sorted({repr(float(values[i])) for i in bad})
            if len(bad) == sum(v is not None for v in values):
                raise RewardFailed(
                    f"reward.{self.name} returned {' or '.join(shown)} for all {len(bad)} completions of a batch: "
                    "it gives no usable reward; fix the reward (return None to skip a completion)"
                )
            for i in bad:
                values[i] = None  # left out of the group statistics, as an abstention
            self.dropped += len(bad)
        log_metric = kwargs.get("log_metric")
        if self.dropped and callable(log_metric):  # logged from the first drop on: the total so far
            log_metric(f"rewards/{self.name}/non_finite", float(self.dropped))
        return values

    def _call_guarded(self, call):
        """Runs `call()` within `timeout` seconds.

        A rule (`runs_inline`) runs on this thread, and `compute` stops it between completions
        once the time is up. Anything else runs in a daemon thread that the main thread waits
        on, still handling signals, so a stop request (SIGINT or SIGTERM) is honoured once the
        call returns or times out; a hung call is abandoned (a daemon thread does not keep the
        process alive).
        """
        if not self.timeout:
            return self._exits(call)
        if self.runs_inline:
            self._deadline = time.monotonic() + float(self.timeout)
            try:
                return self._exits(call)
            finally:
                self._deadline = None
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = call()
            except BaseException as err:  # handed to the caller, SystemExit included
                box["error"] = err
            finally:
                done.set()

        threading.Thread(target=run, name=f"reward-{self.name}", daemon=True).start()
        if not done.wait(float(self.timeout)):
            raise self._timed_out()
        if "error" in box:
            return self._exits(lambda: _reraise(box["error"]))
        return box["value"]

    def _timed_out(self) -> RewardFailed:
        return RewardFailed(
            f"reward.{self.name} did not return within reward.timeout={self.timeout:g} s: it hangs, or needs "
            "longer (raise reward.timeout, or reward.timeout=null for no limit)"
        )

    def _exits(self, call):
        try:
            return call()
        except SystemExit as err:
            raise RewardFailed(
                f"reward.{self.name} called sys.exit({err.code!r}) while scoring: a reward must return its "
                "scores (or raise an exception) instead"
            ) from None

    def compute(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        """Scores a batch: `score` for each completion, with its row's columns."""
        columns = {k: v for k, v in kwargs.items() if k not in TRL_EXTRA_KWARGS}
        rewards = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) > i}
            rewards.append(self.score(message_text(completion), row))
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise self._timed_out()  # a rule past reward.timeout, stopped after this completion
        return rewards

    def option_error(self, key: str, problem: str) -> AlignError:
        return AlignError(f"reward.{self.name}.{key}={getattr(self, key, None)!r} {problem}")
