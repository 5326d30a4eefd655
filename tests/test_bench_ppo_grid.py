"""scripts/bench_ppo.py --grid: the step split and the table, without training anything."""

from __future__ import annotations

import time

from align_cli import testing


def load_script():
    return testing.load_script("bench_ppo")


def test_step_split_moves_a_nested_phase_out_of_its_caller():
    bench = load_script()
    split = bench.StepSplit()

    def inner():
        time.sleep(0.02)

    def outer():
        time.sleep(0.01)
        timed_inner()

    timed_inner = split.wrap(inner, lambda: "value", nested_in="reference")
    timed_outer = split.wrap(outer, lambda: "reference")
    untimed = split.wrap(lambda: time.sleep(0.01), lambda: None)  # phase None: not counted
    timed_outer()
    untimed()
    split.total, split.steps = 0.1, 1
    out = split.result()
    assert 18 <= out["value"] < 40 and 8 <= out["reference"] < 18
    assert abs(sum(out.values()) - 100) < 1e-6  # "update" is the rest of the step


def test_grid_table_gives_ratios_and_marks_cells_not_run():
    bench = load_script()

    def run(eps, rss):
        split = dict.fromkeys(("generation", "reward", "reference", "value", "update"), 10.0)
        return {"eps": eps, "peak_rss_mb": rss, "split": split, "load": 2.0}

    results = {"5m/128/lora": {"params": 4.99e6, "runs": {"ours": [run(3.0, 900)], "trl": [run(1.5, 1000)]}}}
    table = bench.grid_markdown(results, "test machine")
    row = next(line for line in table.splitlines() if line.startswith("| 5m (4.99M) | 128 | lora"))
    assert "**2.00x**" in row and "0.90x" in row
    not_run = [line for line in table.splitlines() if "not run" in line]
    assert len(not_run) == len(bench.GRID_SIZES) * len(bench.GRID_LENGTHS) * len(bench.GRID_MODES) - 1
