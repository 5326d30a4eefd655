"""The cyclic garbage collector around a run (align_cli/collector.py): off while `align train`
imports its libraries, on over what the run makes from its data on, and everything handed back after."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest

from align_cli import collector

PROBE = """
import gc, json, sys

import align_cli.train  # imports neither torch nor transformers (checked below)

state = {"full_before_train": 0, "full_in_train": 0, "torch_before_main": "torch" in sys.modules}
in_train = False


def count(phase, info):
    # A full collection that walked the libraries' objects: none frozen yet.
    if phase == "start" and info["generation"] == 2 and gc.get_freeze_count() < 100_000:
        state["full_in_train" if in_train else "full_before_train"] += 1


gc.callbacks.append(count)
run_trainer = align_cli.train.run_trainer


def watched(*args, **kwargs):  # the models are loaded and the trainer built: training starts
    global in_train
    state.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(), unfrozen=len(gc.get_objects()))
    in_train = True
    gc.collect()  # a full collection in training: counted, and it must leave the frozen objects alone
    state["frozen_after_collect"] = gc.get_freeze_count()
    try:
        return run_trainer(*args, **kwargs)
    finally:
        in_train = False


align_cli.train.run_trainer = watched
from align_cli.cli import main

main(sys.argv[1:])
state.update(enabled_after=gc.isenabled(), frozen_after=gc.get_freeze_count())
print("STATE " + json.dumps(state))
"""


@pytest.fixture
def restore_gc():
    yield
    gc.unfreeze()
    gc.enable()
    collector._deferred = False


def test_real_train_starts_without_full_collections_and_collects_only_new_objects(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "method=sft",
        "method.args.max_steps=2",
        "data.eval_ratio=0",
        "plot=false",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("STATE "))[6:])
    # Importing torch/transformers/TRL and composing: no full collection over the libraries' objects
    # (about 9 without), and none after them while the run reads data, loads and trains (frozen).
    assert not state["torch_before_main"] and state["full_before_train"] == 0, state
    assert state["full_in_train"] == 0 and state["frozen_after_collect"] == state["frozen"], state
    # Training: the collector is on, and the libraries' objects (hundreds of thousands) are frozen:
    # what it walks is the run's (data, model, trainer), far fewer.
    assert state["enabled"] and state["frozen"] > 100_000 and state["unfrozen"] < state["frozen"] / 2, state
    # The run handed everything back to the collector.
    assert state["enabled_after"] and state["frozen_after"] == 0, state
    assert json.loads((run / "summary.json").read_text())["metrics"]["global_step"] == 2


def test_resume_turns_a_deferred_collector_back_on_and_the_run_scope_unfreezes(restore_gc):
    with collector.run_scope():
        collector.defer()
        assert not gc.isenabled()
        before = [object() for _ in range(3)]
        collector.resume()
        assert gc.isenabled() and gc.get_freeze_count() >= len(before)
        made = [[]]
        made[0].append(made)  # a cycle made after resume() is collected
        del made
        assert gc.collect() >= 1
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_run_that_fails_before_resume_leaves_the_collector_on(restore_gc):
    collector.defer()
    with pytest.raises(ValueError), collector.run_scope():
        raise ValueError("a bad config, before the libraries are in")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_collector_someone_else_disabled_stays_off(restore_gc):
    gc.disable()  # by the program that imported align, not by defer()
    with collector.run_scope():
        collector.defer()  # already off: not ours to turn on later
        collector.resume()
        assert not gc.isenabled()
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_only_a_single_train_run_and_pipeline_defer_collection(monkeypatch, restore_gc):
    from align_cli import cli

    seen = {}
    monkeypatch.setattr(cli, "_dispatch", lambda argv: seen.__setitem__(" ".join(argv), gc.isenabled()))
    for command in ("train", "pipeline", "eval", "data", "chat", "export", "version", "train -m"):
        cli.main(command.split())
        gc.enable()
        collector._deferred = False
    assert seen == {
        "train": False,
        "pipeline": False,
        "eval": True,
        "data": True,
        "chat": True,
        "export": True,
        "version": True,
        "train -m": True,  # a sweep: its jobs may run in other processes while this one waits
    }
