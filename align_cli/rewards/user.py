"""User reward functions, loaded by import path.

    align train method=grpo reward=function reward.function.path=my_rewards:brevity

`path` is `module:function` (a module importable from the current directory or the
installed packages) or `file.py:function`. The function has TRL's reward signature,

    def brevity(prompts, completions, **kwargs) -> list[float | None]: ...

and receives every extra dataset column as a keyword argument (e.g. `answer`). A function
that does not take `**kwargs` gets only the keyword arguments it names. `kwargs:` in the
reward's config are bound as fixed keyword arguments (`reward.function.kwargs.scale=2`).

It may be `async def` (e.g. it awaits a judge model's API), as TRL allows: its coroutine runs
to completion on one event loop kept for reward functions (on its own thread, so the loop and
what the function binds to it, such as an HTTP client, last for the whole run).

Besides the columns it gets TRL's extras: `completion_ids`, `trainer_state`,
`log_metric(name, value)` (a scalar averaged into each logged step) and
`log_extra(column, values)` (a column of the completions table), under GRPO (TRL's) and
PPO (ours: metrics join the step's log, or `eval_<name>` while evaluating; extra columns join
the evaluation rows of samples.jsonl). A caller without them gets stand-ins that warn once.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import AlignError, nearest
from .base import Reward

log = logging.getLogger("align")

# TRL's logging callables (GRPO and our PPO pass them; see the module docstring).
LOGGING_KWARGS = ("log_metric", "log_extra")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_awaitable(awaitable: Any) -> Any:
    """Runs a coroutine (or other awaitable) to completion and returns its result.

    All of them run on one event loop on a daemon thread, as TRL runs async reward functions:
    this works whether or not the calling thread runs a loop itself (a notebook does), and
    state bound to the loop survives from one call to the next.
    """
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="align-reward-loop", daemon=True).start()

    async def wait():
        return await awaitable

    return asyncio.run_coroutine_threadsafe(wait(), _loop).result()


def load_function(path: str, where: str = "reward function") -> Callable:
    """Imports `module:function` or `file.py:function` and returns the function.

    Args:
        path: the import path.
        where: how error messages name the setting (e.g. "reward.custom.path").

    Raises:
        AlignError: a malformed path, a module or file that cannot be imported, a missing
            attribute, or one that is not callable; the message names `path`.
    """
    module_name, sep, attr = str(path).rpartition(":")
    # "C:\dir\f.py" has a drive colon; only the last colon separates the function name.
    if not sep or not module_name or not attr.isidentifier():
        raise AlignError(f"{where}={path!r} must look like 'module:function' or 'file.py:function'")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(module_name, path, where)
    else:
        module = _import_module(module_name, path, where)
    if not hasattr(module, attr):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AlignError(
            f"{where}={path!r}: module '{module_name}' has no function '{attr}'{nearest(attr, names)}"
        )
    func = getattr(module, attr)
    if not callable(func):
        raise AlignError(f"{where}={path!r}: '{attr}' is a {type(func).__name__}, not a function")
    return func


def _import_module(module_name: str, path: str, where: str):
    # The `align` console script does not put the working directory on sys.path, but users
    # expect `my_rewards:f` to find ./my_rewards.py, as `python -m` would.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name.split(".")[0]):
            raise AlignError(
                f"{where}={path!r}: no module named '{err.name}' (looked in {cwd} and the installed packages)"
            ) from None
        raise AlignError(f"{where}={path!r}: importing '{module_name}' failed: {err}") from err
    except Exception as err:
        raise AlignError(
            f"{where}={path!r}: importing '{module_name}' raised {type(err).__name__}: {err}"
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)


def _import_file(file_name: str, path: str, where: str):
    file_path = os.path.abspath(os.path.expanduser(file_name))
    if not os.path.isfile(file_path):
        raise AlignError(f"{where}={path!r}: file '{file_name}' does not exist")
    module_name = f"align_user_rewards.{os.path.splitext(os.path.basename(file_path))[0]}"
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise AlignError(
            f"{where}={path!r}: importing '{file_name}' raised {type(err).__name__}: {err}"
        ) from err
    return module


class FunctionReward(Reward):
    """Calls a user function and turns its failures into errors that name it."""

    type = "function"
    main = "path"
    options = {"path": ..., "kwargs": {}}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.func = load_function(self.path, f"reward.{name}.path")
        self.kwargs = dict(self.kwargs or {})
        try:
            params = inspect.signature(self.func).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: pass everything
            params = []
        self.takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params)
        self.accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self._stand_ins = {name: self._unrecorded(name) for name in LOGGING_KWARGS}

    def _unrecorded(self, name: str) -> Callable:
        """What a caller without TRL's `name` callable gets instead: warns once, drops the values."""
        warned = []

        def stand_in(*args: Any, **kwargs: Any) -> None:
            if not warned:
                warned.append(True)
                log.warning(
                    "reward.%s: '%s' calls %s, which this trainer does not record (GRPO does); its values are dropped",
                    self.name,
                    self.path,
                    name,
                )

        return stand_in

    def compute(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        kwargs = {"prompts": prompts, "completions": completions, **self._stand_ins, **kwargs, **self.kwargs}
        if not self.takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        try:
            out = self.func(**kwargs)
            if inspect.isawaitable(out):  # an async function, as TRL allows
                out = run_awaitable(out)
        except AlignError:
            raise
        except Exception as err:
            raise AlignError(
                f"reward function '{self.path}' (reward.{self.name}) raised {type(err).__name__}: {err}"
            ) from err
        return self._check(out, len(completions))

    def _check(self, out: Any, expected: int) -> list[float | None]:
        if hasattr(out, "tolist"):  # numpy arrays and tensors
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != expected:
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise AlignError(
                f"reward function '{self.path}' (reward.{self.name}) returned {got}; "
                f"it must return a list of {expected} floats (one per completion, None to skip)"
            )
        values: list[float | None] = []
        for value in out:
            if value is None:
                values.append(None)
                continue
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                raise AlignError(
                    f"reward function '{self.path}' (reward.{self.name}) returned {value!r}, which is not a number"
                ) from None
        return values
