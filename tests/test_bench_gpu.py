"""scripts/bench_gpu.py's dry run: the GPU benchmark's code paths on a CPU, so it does not rot.

Every cell's arguments are checked to compose; two cells (SFT with its MFU arithmetic, GRPO with
its episodes) run end to end, one `align train` process each, about 10 s apiece.
"""

from __future__ import annotations

import json
from pathlib import Path

from align_cli import testing

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    return testing.load_script("bench_gpu")


def test_flops_per_token_counts_qwen05_parameters():
    bench = load_script()
    # Qwen2.5-0.5B has 494M parameters (embedding tied with the LM head); the matmuls use ~all of them.
    two_n = bench.flops_per_token(bench.QWEN05_SHAPE, seq_len=0, passes=1)
    assert abs(two_n / 2 - 494e6) / 494e6 < 0.01
    # Attention adds 4 L H T per pass: 6N + 12 L H T for forward + backward.
    with_attn = bench.flops_per_token(bench.QWEN05_SHAPE, seq_len=512, passes=3)
    assert with_attn - 3 * two_n == 12 * 24 * 896 * 512


def test_every_cell_composes_and_its_settings_reach_align(tmp_path):
    """Each cell's `align train` arguments (GPU mode and dry run) pass align's checks, with the
    settings the cell is about: packing, LoRA and 4 bit, the PPO and GRPO batch shapes."""
    from align_cli.modeling import build_tiny_model
    from align_cli.run_checks import checked_config
    from align_cli.testing import compose

    bench = load_script()
    model = build_tiny_model()  # a folder that exists (the GPU run builds a 0.5B-shaped one)
    data = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "dpo", "prompts")}
    for dry in (False, True):
        mode = bench.MODES["dry" if dry else "gpu"]
        for cell in bench.CELLS:
            cfg = compose(bench.cell_overrides(cell, mode, model, data, dry))
            _, ctx, _ = checked_config(cfg)
            args = ctx.config
            assert args.max_steps > 0 or getattr(args, "total_episodes", None), cell
            if cell == "sft_packing":
                assert args.packing
            if cell in ("lora", "qlora"):
                assert cfg.peft.method == "lora" and cfg.quant.bits == (4 if cell == "qlora" else None)
            if cell == "ppo":
                assert args.rollout_batch_size == mode["ppo_batch"]
            if cell == "grpo":
                assert args.num_generations == mode["grpo_generations"]


def test_dry_run_trains_a_token_cell_and_an_episode_cell(tmp_path, capsys):
    """Two cells run end to end on the CPU (each its own `align train` process, as on a GPU): SFT
    with its tokens/s and MFU arithmetic, and GRPO with its episodes/s; the others are checked to
    compose above (and their methods train in the rest of the suite)."""
    bench = load_script()
    doc_before = (ROOT / "docs" / "benchmarks.md").read_text()
    results = bench.main(["--dry-run", "--workdir", str(tmp_path), "--cells", "sft,grpo"])
    assert set(results) == {"sft", "grpo"}
    assert results["sft"]["tokens_per_s"] > 0 and results["sft"]["num_tokens"] > 0
    assert results["sft"]["flops_per_token"] > 0
    assert results["grpo"]["episodes_per_s"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dry_run"] and saved["results"]["grpo"]["steps"] >= 1
    out = capsys.readouterr().out
    assert "| sft | SFT full" in out and "| grpo | GRPO full" in out
    # A dry run does not overwrite the doc's figures.
    assert (ROOT / "docs" / "benchmarks.md").read_text() == doc_before
