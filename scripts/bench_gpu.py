"""GPU benchmark: align's SFT, DPO, QLoRA, PPO and GRPO on a Qwen2.5-0.5B-shaped model.

    python scripts/bench_gpu.py                 # on a GPU (about 6-8 min on one H100/H200)
    python scripts/bench_gpu.py --dry-run       # on a CPU: the tiny model, 1-2 steps per cell
    python scripts/bench_gpu.py --cells sft,dpo --no-doc

Every cell is the real command, `align train method=<m> ...`, run in its own process (so each
cell's peak memory is its own), on a model built here from a config (no hub): a random-init
Qwen2 with Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 key-value heads,
intermediate 4864, vocabulary 151,936, tied embeddings; 494M parameters) in bf16 with SDPA
attention, and the tiny tokenizer (its 1,024 ids are a subset of the vocabulary, so the
embedding and LM-head matmuls have the real model's size). Data are synthetic rows of random
words written here (fixed seed).

Cells (what each measures):

- `sft`: full fine-tuning, tokens/s (TRL's `num_tokens`: real, non-pad tokens, over
  `train_runtime`) and MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s.
  FLOPs per token: 6 N + 12 L H T (the PaLM formula: N the parameters the matmuls use, the LM
  head included; L layers, H hidden size, T the mean sequence length).
- `sft_packing`: the same with `packing=true` (best-fit decreasing, padding-free). TRL 1.16
  supports padding-free batches only with FlashAttention 2/3, so this cell runs only when
  the `flash_attn` package is importable (else it is reported as not run).
- `dpo`: full fine-tuning, tokens/s of chosen + rejected rows; FLOPs per token 8 N + ...
  (the policy's forward and backward, and the reference's forward, which TRL 1.16 computes
  every step). TRL 1.16 has no padding-free DPO (`padding_free=true` falls back to padding).
- `lora` and `qlora`: SFT with a LoRA adapter (r 16, all linear layers) on the bf16 base and
  on the NF4 (4-bit, double-quantised) base: peak memory (`torch.cuda.max_memory_allocated`)
  and tokens/s.
- `ppo`, `grpo`: episodes (sampled and trained-on responses) per second with 256 new tokens
  (`min_new_tokens`-free sampling from a random-init model rarely stops early, so most
  responses are the full 256), a length reward (no reward model), LoRA off.

Activation checkpointing is off in every cell (align turns it on by default on a GPU; a 0.5B
model fits an H100 without it, and it would cost about a third of the throughput).

`--dry-run` runs the same cells through the same code (data, model folder, `align train`
processes, result parsing, the doc section) on a CPU with the tiny model and 1-2 steps per
cell, so tests/test_bench_gpu.py keeps this script from rotting; its figures mean nothing and
it writes no doc unless `--doc` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
WORK = ROOT / ".bench" / "gpu"

# Qwen2.5-0.5B's shape (its config.json), built with random weights.
QWEN05_SHAPE = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# Peak dense bf16 tensor FLOP/s (no sparsity) by the name CUDA reports; MFU is left blank for others.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

# Per mode: rows, lengths and steps. GPU: sized to finish in under 8 minutes on one H100/H200.
MODES = {
    "gpu": {
        "sft_rows": 512,
        "sft_words": (60, 220),
        "max_length": 1024,
        "sft_batch": 16,
        "sft_steps": 30,
        "dpo_batch": 8,
        "dpo_steps": 20,
        "new_tokens": 256,
        "ppo_batch": 32,
        "ppo_steps": 3,
        "grpo_batch": 32,
        "grpo_generations": 8,
        "grpo_steps": 3,
        "timeout": 150,
    },
    "dry": {
        "sft_rows": 16,
        "sft_words": (5, 20),
        "max_length": 128,
        "sft_batch": 4,
        "sft_steps": 2,
        "dpo_batch": 2,
        "dpo_steps": 1,
        "new_tokens": 8,
        "ppo_batch": 4,
        "ppo_steps": 1,
        "grpo_batch": 4,
        "grpo_generations": 2,
        "grpo_steps": 1,
        "timeout": 300,
    },
}

CELLS = ("sft", "sft_packing", "dpo", "lora", "qlora", "ppo", "grpo")


# --- model and data ---------------------------------------------------------------------------


def build_model(folder: Path, dry: bool) -> Path:
    """The 0.5B-shaped random-init model (or the tiny model for a dry run), saved once."""
    sys.path.insert(0, str(ROOT))
    from align_cli.modeling import build_tiny_model

    tiny = build_tiny_model()
    if dry:
        return tiny
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = Qwen2Config(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **QWEN05_SHAPE,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path, mode: dict) -> dict[str, Path]:
    """Synthetic SFT, preference and prompt files (random lowercase words, fixed seed)."""
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(500)
    ]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = mode["sft_words"]
    files = {name: folder / f"{name}.jsonl" for name in ("sft", "dpo", "prompts")}
    rows = mode["sft_rows"]
    with open(files["sft"], "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": text(5, 20), "input": "", "output": text(lo, hi)}) + "\n")
    with open(files["dpo"], "w") as f:
        for _ in range(rows):
            row = {"instruction": text(5, 20), "input": "", "chosen": text(lo, hi), "rejected": text(lo, hi)}
            f.write(json.dumps(row) + "\n")
    with open(files["prompts"], "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": text(5, 20), "input": ""}) + "\n")
    return files


# --- cells --------------------------------------------------------------------------------------


def cell_overrides(cell: str, mode: dict, model: Path, data: dict[str, Path], dry: bool) -> list[str]:
    """The `align train` arguments of one cell."""
    common = [
        f"model.name_or_path={model}",
        f"model.dtype={'float32' if dry else 'bfloat16'}",
        f"model.max_length={mode['max_length']}",
        f"model.attn_implementation={'flash_attention_2' if cell == 'sft_packing' and not dry else 'sdpa'}",
        "plot=false",
        "method.args.activation_checkpointing=false",
        "method.args.save_strategy=no",
        "method.args.eval_strategy=no",
        "method.args.logging_steps=1",
    ]
    if cell in ("sft", "sft_packing", "lora", "qlora"):
        out = [
            "method=sft",
            f"data.path={data['sft']}",
            f"method.args.per_device_train_batch_size={mode['sft_batch']}",
            f"method.args.max_steps={mode['sft_steps']}",
            f"method.args.learning_rate={1e-4 if cell in ('lora', 'qlora') else 1e-5}",
        ]
        if cell == "sft_packing":
            out += ["method.args.packing=true"]
        if cell in ("lora", "qlora"):
            out += ["peft=lora"]
        if cell == "qlora":
            out += ["quant=4bit"]
        return common + out
    if cell == "dpo":
        return common + [
            "method=dpo",
            f"data.path={data['dpo']}",
            f"method.args.per_device_train_batch_size={mode['dpo_batch']}",
            f"method.args.max_steps={mode['dpo_steps']}",
            "method.args.learning_rate=1e-6",
        ]
    if cell == "ppo":
        return common + [
            "method=ppo",
            "reward=length",
            f"data.path={data['prompts']}",
            f"method.args.per_device_train_batch_size={mode['ppo_batch'] // 2}",
            "method.args.gradient_accumulation_steps=1",
            "method.args.num_mini_batches=2",
            "method.args.num_ppo_epochs=2",
            f"method.args.max_new_tokens={mode['new_tokens']}",
            f"method.args.total_episodes={mode['ppo_batch'] * mode['ppo_steps']}",
            "method.args.learning_rate=1e-6",
        ]
    if cell == "grpo":
        return common + [
            "method=grpo",
            "reward=length",
            f"data.path={data['prompts']}",
            f"method.args.per_device_train_batch_size={mode['grpo_batch']}",
            f"method.args.num_generations={mode['grpo_generations']}",
            f"method.args.max_completion_length={mode['new_tokens']}",
            f"method.args.max_steps={mode['grpo_steps']}",
            "method.args.learning_rate=1e-6",
        ]
    raise ValueError(f"unknown cell {cell}")


def run_cell(argv: list[str], result_file: Path) -> None:
    """In the child process: `align train <argv>` in-process, then its peak memory and timings."""
    sys.path.insert(0, str(ROOT))
    import torch

    from align_cli.cli import main as align_main

    started = time.perf_counter()
    align_main(["train", *argv])
    wall = time.perf_counter() - started
    out = {
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    result_file.write_text(json.dumps(out))


def read_metrics(run_dir: Path) -> dict:
    """train_runtime, the last num_tokens, and steps from the run's metrics.jsonl."""
    lines = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    final = next(e for e in reversed(lines) if "train_runtime" in e)
    tokens = [e["num_tokens"] for e in lines if "num_tokens" in e]
    return {
        "train_runtime": final["train_runtime"],
        "samples_per_s": final.get("train_samples_per_second"),
        "num_tokens": tokens[-1] if tokens else None,
        "steps": final["step"],
    }


def flops_per_token(config: dict, seq_len: float, passes: float) -> float:
    """Model FLOPs per token: passes x 2 N + passes x 4 L H T (PaLM's 6N + 12LHT has passes = 3)."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    n = layers * per_layer + config["vocab_size"] * h  # the LM head's matmul counts, the lookup does not
    return passes * 2 * n + passes * 4 * layers * h * seq_len


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU dry run)"


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def mean_sequence_length(file: Path, model: Path, columns: tuple[str, ...], max_length: int) -> float:
    """Mean token length of prompt + each completion column, truncated like the trainer truncates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for line in file.read_text().splitlines():
        row = json.loads(line)
        prompt = len(tokenizer(row["instruction"])["input_ids"])
        for col in columns:
            lengths.append(min(max_length, prompt + len(tokenizer(row[col])["input_ids"]) + 8))
    return sum(lengths) / len(lengths)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1-2 steps per cell")
    parser.add_argument(
        "--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}"
    )
    parser.add_argument("--workdir", default=str(WORK), help="where the model, data and runs go")
    parser.add_argument("--no-doc", action="store_true", help="print the section, do not write the doc")
    parser.add_argument("--doc", action="store_true", help="write the doc section even in a dry run")
    parser.add_argument("--cell-child", nargs=2, metavar=("RESULT", "ARGV_JSON"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.cell_child:
        run_cell(json.loads(opts.cell_child[1]), Path(opts.cell_child[0]))
        return {}
    dry = opts.dry_run
    mode = MODES["dry" if dry else "gpu"]
    cells = [c for c in opts.cells.split(",") if c]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; known: {', '.join(CELLS)}")
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(work / "qwen2.5-0.5b-shape", dry)
    data = write_data(work / "data", mode)
    config = json.loads((model / "config.json").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results: dict[str, dict] = {}
    for cell in cells:
        if cell == "sft_packing" and (dry or importlib.util.find_spec("flash_attn") is None):
            results[cell] = {"skipped": "needs FlashAttention 2/3 (the `flash_attn` package)"}
            if not dry:
                print(f"bench-gpu: {cell}: not run ({results[cell]['skipped']})", flush=True)
                continue
            # A dry run still exercises the cell's arguments, on SDPA (TRL warns; nothing is measured).
        run_dir = work / "runs" / cell
        args = cell_overrides(cell, mode, model, data, dry) + [f"hydra.run.dir={run_dir}"]
        result_file = work / "runs" / f"{cell}.json"
        result_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--cell-child",
            str(result_file),
            json.dumps(args),
        ]
        print(f"bench-gpu: {cell}: align train {' '.join(args)}", flush=True)
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, timeout=mode["timeout"], capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            results[cell] = {"failed": f"timed out after {mode['timeout']} s"}
            continue
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            results[cell] = {"failed": f"exit {proc.returncode}: {tail[-1] if tail else ''}"}
            print("\n".join(tail), file=sys.stderr, flush=True)
            continue
        res = {**json.loads(result_file.read_text()), **read_metrics(run_dir)}
        if cell in ("sft", "sft_packing", "lora", "qlora", "dpo"):
            res["tokens_per_s"] = res["num_tokens"] / res["train_runtime"] if res["num_tokens"] else None
        if cell == "ppo":
            res["episodes_per_s"] = res["samples_per_s"]
        if cell == "grpo":
            res["episodes_per_s"] = mode["grpo_batch"] * res["steps"] / res["train_runtime"]
        results.setdefault(cell, {}).update(res)
        print(f"bench-gpu: {cell}: {json.dumps(results[cell])}", flush=True)
    name = gpu_name()
    peak = peak_flops(name)
    for cell, passes, file, cols in (
        ("sft", 3, data["sft"], ("output",)),
        ("sft_packing", 3, data["sft"], ("output",)),
        ("lora", None, None, None),
        ("qlora", None, None, None),
        ("dpo", 4, data["dpo"], ("chosen", "rejected")),
    ):
        res = results.get(cell, {})
        if passes and res.get("tokens_per_s"):
            seq = mean_sequence_length(file, model, cols, mode["max_length"])
            res["flops_per_token"] = flops_per_token(config, seq, passes)
            if peak and not dry:
                res["mfu"] = res["tokens_per_s"] * res["flops_per_token"] / peak
    elapsed = time.perf_counter() - started
    section = markdown(results, name, mode, dry, elapsed)
    print(section)
    if (not dry and not opts.no_doc) or opts.doc:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench import update_section

        update_section("gpu", section, DOC)
        print(f"bench-gpu: wrote the gpu section of {DOC.relative_to(ROOT)}")
    (work / "results.json").write_text(
        json.dumps({"gpu": name, "dry_run": dry, "results": results}, indent=1)
    )
    failed = [c for c, r in results.items() if "failed" in r]
    if failed:
        raise SystemExit(f"bench-gpu: failed cell(s): {', '.join(failed)}")
    return results


def markdown(results: dict, name: str, mode: dict, dry: bool, elapsed: float) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import machine_info

    def fmt(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    def state(res: dict) -> str:
        return res.get("skipped") or res.get("failed") or ""

    lines = [
        "## GPU: SFT, DPO, QLoRA, PPO and GRPO on a Qwen2.5-0.5B-shaped model",
        "",
        "Reproduce: `make bench-gpu` (= `python3 scripts/bench_gpu.py`; how it measures: its docstring). "
        f"GPU: **{name}**; this run took {elapsed / 60:.1f} min.",
        "",
        "| cell | what | tokens/s | MFU | episodes/s | peak GPU memory (MB) | peak RSS (MB) | train s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    what = {
        "sft": f"SFT full, bf16, SDPA, batch {mode['sft_batch']}, {mode['sft_steps']} steps",
        "sft_packing": "SFT full, packing (BFD, padding-free), FlashAttention 2",
        "dpo": f"DPO full, bf16, SDPA, batch {mode['dpo_batch']} pairs, {mode['dpo_steps']} steps",
        "lora": "SFT, LoRA r16 on the bf16 base",
        "qlora": "SFT, LoRA r16 on the NF4 base (QLoRA)",
        "ppo": f"PPO full, {mode['new_tokens']} new tokens, rollout {mode['ppo_batch']}, {mode['ppo_steps']} steps",
        "grpo": f"GRPO full, {mode['new_tokens']} new tokens, {mode['grpo_batch']} completions/step "
        f"({mode['grpo_generations']} per prompt), {mode['grpo_steps']} steps",
    }
    for cell in CELLS:
        if cell not in results:
            continue
        res = results[cell]
        lines.append(
            f"| {cell} | {what[cell]} | {fmt(res.get('tokens_per_s'), '.0f')} | "
            f"{fmt(res.get('mfu') and 100 * res['mfu'], '.1f')}{'%' if res.get('mfu') else ''} | "
            f"{fmt(res.get('episodes_per_s'), '.2f')} | {fmt(res.get('cuda_peak_mb'), '.0f')} | "
            f"{fmt(res.get('peak_rss_mb'), '.0f')} | "
            f"{fmt(res.get('train_runtime'), '.1f')} | {state(res)} |"
        )
    lora, qlora = results.get("lora", {}), results.get("qlora", {})
    if lora.get("cuda_peak_mb") and qlora.get("cuda_peak_mb"):
        lines += ["", f"QLoRA / bf16 LoRA peak memory: {qlora['cuda_peak_mb'] / lora['cuda_peak_mb']:.2f}x."]
    lines += ["", f"Machine: {name}; {machine_info()}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
