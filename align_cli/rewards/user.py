"""User reward functions, loaded by import path.

    align train method=grpo reward=function reward.function.path=my_rewards:brevity

`path` is `module:function` (a module importable from the current directory or the
installed packages) or `file.py:function`. The function has TRL's reward signature,

    def brevity(prompts, completions, **kwargs) -> list[float | None]: ...

and receives every extra dataset column as a keyword argument (e.g. `answer`). A function
that does not take `**kwargs` gets only the keyword arguments it names. `kwargs:` in the
reward's config are bound as fixed keyword arguments (`reward.function.kwargs.scale=2`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import AlignError, nearest
from .base import Reward


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

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        kwargs = {"prompts": prompts, "completions": completions, **kwargs, **self.kwargs}
        if not self.takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        try:
            out = self.func(**kwargs)
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
