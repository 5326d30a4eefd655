"""Python's cyclic garbage collector around a training run: off while align imports its libraries,
then on over what the run makes.

Importing torch, transformers, TRL and peft makes about 900k Python objects that live as long as
the process. The cyclic collector walks all of them at each full collection: about 9 of them
while those libraries import (1-2 s of an `align train` start-up on a CPU core, measured), and
0.3-0.7 s each time one falls inside a run. Reference counting frees everything else: after those
imports about 15k objects are cyclic garbage, a few MB.

- `defer()` (the CLI, first thing for `align train` (not a sweep) and `align pipeline`): no
  cyclic collection while the libraries import and the config composes.
- `resume()` (a run's `plan_run`, once its checks have imported the libraries and before it reads
  the data, `align_cli/train.py`): the objects made so far move to the permanent generation
  (`gc.freeze`) and the collector runs again, so reading the data, loading the models and training
  collect their own garbage, and full collections look only at what the run made.
- `run_scope()` (around each run): when it ends, the frozen objects go back to the collector
  (`gc.unfreeze`), so nothing the run dropped outlives it (a sweep's next job, a pipeline's next
  stage), and a deferred collector is on again whatever happened.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_deferred = False  # disabled by `defer()`, not by whoever imported align


def defer() -> None:
    """Turns cyclic collection off until `resume()`."""
    global _deferred
    if gc.isenabled():
        gc.disable()
        _deferred = True


def _end_deferral() -> None:
    global _deferred
    if _deferred:
        _deferred = False
        gc.enable()


def resume() -> None:
    """Freezes the objects made so far; turns collection back on if `defer()` turned it off."""
    gc.freeze()
    _end_deferral()


@contextmanager
def run_scope() -> Iterator[None]:
    """One run: what it froze goes back to the collector when it ends, and a deferred collector is on."""
    try:
        yield
    finally:
        _end_deferral()
        gc.unfreeze()
