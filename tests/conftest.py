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


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


@pytest.fixture(scope="session", autouse=True)
def _align_cache(tmp_path_factory):
    """Builds the tiny model into a per-session cache, so tests never depend on ~/.cache."""
    os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align-cache"))
    yield


def snapshot(model) -> dict:
    """A detached copy of every parameter, keyed by name."""
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    """Names of parameters whose values differ from the snapshot."""
    after = dict(model.named_parameters())
    return {n for n, t in before.items() if not (after[n].detach().float() == t).all()}
