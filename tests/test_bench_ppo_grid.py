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

    results = {
        "5m/128/lora": {
            "params": 4.99e6,
            "runs": {"ours": [run(3.0, 900)], "trl": [run(1.5, 1000)]},
            "spec": {"episodes": 64},
            "run_at": "2026-12-02 00:30 UTC, align at abc1234",
        },
        "tiny/32/full": {
            "params": 1.9e5,
            "runs": {"ours": [run(2.0, 500)], "trl": [run(1.0, 500)]},
            "source": "restored from the doc",
        },
    }
    table = bench.grid_markdown(results, "test machine")
    row = next(line for line in table.splitlines() if line.startswith("| 5m (4.99M) | 128 | lora"))
    assert "**2.00x**" in row and "0.90x" in row
    # Cells add up over runs on different days and code: each says its episodes and its run.
    assert row.endswith("| 64 | 2026-12-02 00:30 UTC, align at abc1234 |")
    restored = next(line for line in table.splitlines() if line.startswith("| tiny (0.19M) | 32 | full"))
    assert restored.endswith("| not recorded (restored) |") and "\n(restored): " in table
    not_run = [line for line in table.splitlines() if "not run" in line]
    assert len(not_run) == len(bench.GRID_SIZES) * len(bench.GRID_LENGTHS) * len(bench.GRID_MODES) - 2


def test_grid_keeps_the_cells_another_grid_command_saved_meanwhile(tmp_path, monkeypatch):
    """Two grid commands side by side (one per core) both land in results.json, each cell stamped."""
    import argparse
    import json

    bench = load_script()
    monkeypatch.setattr(bench, "GRID_WORK", tmp_path)
    monkeypatch.setattr(bench, "GRID_RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "prepare", lambda: {"prompts": "prompts.jsonl"})
    monkeypatch.setattr(bench, "grid_models", lambda size: {"policy": "p", "reward": "r", "params": 1e6})
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"tiny/32/full": {"params": 1, "runs": {}}}))

    def run_side(side, python, spec, out):
        # The other command finishes a cell while this one is still running.
        other = json.loads(saved.read_text())
        other["5m/32/lora"] = {"params": 2, "runs": {}}
        saved.write_text(json.dumps(other))
        split = dict.fromkeys(("generation", "reward", "reference", "value", "update"), 1.0)
        return {"seconds": 2.0, "peak_rss_mb": 100.0, "split": split}

    monkeypatch.setattr(bench, "run_side", run_side)
    args = argparse.Namespace(
        sizes="5m", lengths="128", modes="full", device="cpu", threads=1, grid_episodes=64, rollout_batch=32,
        micro_batch=16, ppo_epochs=4, kl_coef=0.05, temperature=1.0, seed=0, repeats=1, old_logprobs="forward",
    )  # fmt: skip
    bench.run_grid(args, {"trl": "python", "ours": "python"})
    results = json.loads(saved.read_text())
    assert set(results) == {"tiny/32/full", "5m/32/lora", "5m/128/full"}
    cell = results["5m/128/full"]
    assert cell["runs"]["ours"][0]["eps"] == 32.0 and cell["spec"]["episodes"] == 64
    assert " UTC, align at " in cell["run_at"]
    # Ours with old_logprobs=generation: a cell of its own, beside the default one, in a table of its own.
    args.old_logprobs = "generation"
    bench.run_grid(args, {"trl": "python", "ours": "python"})
    results = json.loads(saved.read_text())
    assert (
        "5m/128/full" in results and results["5m/128/full/generation"]["spec"]["old_logprobs"] == "generation"
    )
    both = {key: results[key] for key in ("5m/128/full", "5m/128/full/generation")}
    table = bench.grid_markdown(both, "test machine")
    main, generation = table.split("old_logprobs=generation` (log pi_old")
    assert (
        main.count("| 5m (1.00M) | 128 | full |") == 1
        and generation.count("| 5m (1.00M) | 128 | full |") == 1
    )
