"""scripts/bench_adapter.py's check that both sides train with the same config."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch


def test_same_config_check_allows_align_only_options_left_off_and_names_the_rest(tmp_path, monkeypatch):
    import trl

    from align_cli.methods.grpo_config import GRPOConfig

    # Imported by name (it defines dataclasses, and imports scripts/bench.py).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    bench = importlib.import_module("bench_adapter")
    folders = {}
    for side, config in {
        "align": GRPOConfig(output_dir=str(tmp_path / "align"), report_to="none", use_cpu=True, bf16=False),
        "trl": trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False),
        "align-ptx": GRPOConfig(
            output_dir=str(tmp_path / "align-ptx"), report_to="none", use_cpu=True, bf16=False, ptx_coef=0.5
        ),
    }.items():
        folders[side] = tmp_path / side
        folders[side].mkdir()
        torch.save(config, folders[side] / "training_args.bin")
    # GRPO's ptx_coef (align's own, TRL's config lacks it) at its default 0: the same training.
    bench.check_same_config(folders["align"], folders["trl"])
    with pytest.raises(bench.BenchError, match="ptx_coef: align=0.5 trl=None"):
        bench.check_same_config(folders["align-ptx"], folders["trl"])
