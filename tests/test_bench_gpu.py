"""scripts/bench_gpu.py's dry run: the GPU benchmark's code paths on a CPU, so it does not rot.

Four cells (one per kind: full SFT with its MFU arithmetic, QLoRA, PPO, GRPO), one `align train`
process each, about 8 s apiece.
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


def test_dry_run_runs_every_kind_of_cell(tmp_path, capsys):
    bench = load_script()
    doc_before = (ROOT / "docs" / "benchmarks.md").read_text()
    results = bench.main(["--dry-run", "--workdir", str(tmp_path), "--cells", "sft,qlora,ppo,grpo"])
    assert set(results) == {"sft", "qlora", "ppo", "grpo"}
    for cell in ("sft", "qlora"):
        assert results[cell]["tokens_per_s"] > 0 and results[cell]["num_tokens"] > 0
    assert results["sft"]["flops_per_token"] > 0
    for cell in ("ppo", "grpo"):
        assert results[cell]["episodes_per_s"] > 0
    # The QLoRA cell trained and saved a LoRA adapter (peft=lora quant=4bit reached align).
    assert (tmp_path / "runs" / "qlora" / "adapter_config.json").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dry_run"] and saved["results"]["ppo"]["steps"] == 1
    out = capsys.readouterr().out
    assert "| sft | SFT full" in out and "| grpo | GRPO full" in out
    # A dry run does not overwrite the doc's figures.
    assert (ROOT / "docs" / "benchmarks.md").read_text() == doc_before
