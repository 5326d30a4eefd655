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


def test_the_same_training_check_reads_every_logged_step_not_only_the_loss(monkeypatch):
    """GRPO's loss is about 0 whatever was sampled: two runs whose rewards or completion lengths
    differ at some step are not the same training, though their losses agree."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    bench = importlib.import_module("bench_adapter")

    def run(side, history, steps=(0.2, 0.1, 0.1, 0.3)):
        return bench.Run(
            side=side, wall_s=10, cpu_s=10, loop_wall_s=2, loop_cpu_s=2, samples=40, samples_per_s=20,
            train_loss=0.0, plot_s=0, plot_cpu_s=0, own_loop_cpu_s=0, step_wall_s=list(steps), log_history=history,
        )  # fmt: skip

    same = [{"loss": 0.0, "reward": 0.5, "completions/mean_length": 32.0, "step": 1}, {"train_loss": 0.0}]
    longer = [{"loss": 0.0, "reward": 0.5, "completions/mean_length": 30.0, "step": 1}, {"train_loss": 0.0}]
    more = [same[0], {**same[0], "step": 2}, same[1]]
    result = bench.Result("grpo", 1, 4, [run("align", same), run("trl", same, steps=(0.2, 0.1, 0.2, 0.2))])
    assert result.loss_gap == 0.0
    assert result.step_ratio() == pytest.approx(0.2 / 0.1)  # medians without the first step
    assert bench.Result("grpo", 1, 4, [run("align", same), run("trl", longer)]).loss_gap == 2.0
    assert bench.Result("grpo", 1, 4, [run("align", same), run("trl", same[1:])]).loss_gap == float("inf")
    assert bench.Result("grpo", 1, 4, [run("align", same), run("trl", more)]).loss_gap == float("inf")


def test_step_floor_takes_each_steps_fastest_run_per_side(monkeypatch):
    """A burst of load slows one step of one run: the floor keeps the other runs' time for that step."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    bench = importlib.import_module("bench_adapter")

    def run(side, steps):
        return bench.Run(
            side=side, wall_s=10, cpu_s=10, loop_wall_s=2, loop_cpu_s=2, samples=40, samples_per_s=20,
            train_loss=0.0, plot_s=0, plot_cpu_s=0, own_loop_cpu_s=0, step_wall_s=list(steps), log_history=[],
        )  # fmt: skip

    result = bench.Result(
        "grpo",
        4,
        4,
        [
            run("align", (9.0, 0.10, 0.50, 0.20)),  # the first step (warm-up) is left out
            run("align", (9.0, 0.40, 0.30, 0.20)),
            run("trl", (1.0, 0.12, 0.30, 0.90)),
            run("trl", (1.0, 0.20, 0.33, 0.18)),
        ],
    )
    assert result.floor_s("align") == pytest.approx(0.10 + 0.30 + 0.20)
    assert result.floor_s("trl") == pytest.approx(0.12 + 0.30 + 0.18)
    assert result.floor_ratio() == pytest.approx(0.60 / 0.60)
    assert bench.steal_s() is None or bench.steal_s() >= 0
