"""Python's cyclic garbage collector around a training run: off while align starts, then run over
what the run itself makes.

Importing torch, transformers, TRL and peft makes about 900k Python objects that live as long as
the process. The cyclic collector walks all of them at each full collection: about 9 of them
while those libraries import (1-2 s of an `align train` start-up on a CPU core, measured), and
0.3-0.7 s each time one falls inside training. Reference counting frees everything else, so
nothing but cycles waits: about 15k objects are cyclic garbage after those imports, a few MB.

- `defer()` (the CLI, first thing for `align train` (not a sweep) and `align pipeline`): no cyclic collection
  while the libraries import, the config composes and the data is read.
- `resumed()` (around each run's model loading, training and saving, `align_cli/train.py`): the
  objects made so far move to the permanent generation (`gc.freeze`), the collector runs again,
  and full collections in training look only at what the run made since. When the block ends they
  go back to the collector (`gc.unfreeze`), so nothing made before it outlives a run that drops it
  (a sweep's next job, a pipeline's next stage).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_deferred = False  # disabled by `defer()`, not by whoever imported align


def defer() -> None:
    """Turns cyclic collection off until the first `resumed()` block."""
    global _deferred
    if gc.isenabled():
        gc.disable()
        _deferred = True


@contextmanager
def resumed() -> Iterator[None]:
    """Cyclic collection on (if `defer()` turned it off, or it was on), over objects made from here."""
    global _deferred
    collect = gc.isenabled() or _deferred
    _deferred = False
    gc.freeze()
    if collect:
        gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
