"""Shared fixtures: a private model cache, offline mode, and small helpers for weight checks."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers on 2 cores (pytest-xdist): one thread each, for this
# process and the subprocesses it starts (a tiny model gains nothing from a second thread, and
# two workers with two threads each would oversubscribe the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The files that take longest (learning runs, torchrun launches) run first, longest first
# (measured on 2 cores, 2026-12-01): `make test` hands whole files to its two workers in this
# order (`--dist loadfile --no-loadscope-reorder`; xdist would otherwise order files by their
# number of tests and hand out the 2-test, 3.5-minute test_alignment.py last, one core idling
# while the other finishes it).
SLOW_FILES_FIRST = (
    "test_alignment.py",
    "test_dist.py",
    "test_deepspeed.py",
    "test_sweep.py",
    "test_distributed.py",
    "test_errors.py",
    "test_serve.py",
    "test_pipeline.py",
    "test_bench_gpu.py",
    "test_cli.py",
    "test_config.py",
    "test_eval.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and among the others, is kept


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


@pytest.fixture(scope="session", autouse=True)
def _library_log_handlers():
    """transformers makes its log handler on first use, bound to the sys.stderr of that moment.
    Made inside a test that captures stderr (capsys), it would write to that test's stream,
    closed once the test ends, and a later test's warnings would print "--- Logging error ---"
    tracebacks into its own captured output. Made here, it writes to the session's stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")
    yield


@pytest.fixture(scope="session", autouse=True)
def _align_cache(tmp_path_factory):
    """Builds the tiny model into a per-session cache, so tests never depend on ~/.cache."""
    os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align-cache"))
    yield


@pytest.fixture(scope="module")
def rm_run_folder(tmp_path_factory):
    """A reward model as `align train method=rm` leaves it: a run folder (3 pairwise steps)."""
    from align_cli.testing import compose
    from align_cli.train import train

    path = tmp_path_factory.mktemp("rm_run")
    overrides = ["method=rm", "method.args.max_steps=3", "method.args.per_device_train_batch_size=4"]
    train(compose([*overrides, "data.eval_ratio=0", "plot=false"], path))
    return path


def snapshot(model) -> dict:
    """A detached copy of every parameter, keyed by name."""
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    """Names of parameters whose values differ from the snapshot."""
    after = dict(model.named_parameters())
    return {n for n, t in before.items() if not (after[n].detach().float() == t).all()}
