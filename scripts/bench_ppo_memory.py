"""PPO memory: what each of the four roles costs, and what the cheap options save.

    python scripts/bench_ppo_memory.py           # CPU, a few minutes; rewrites its section of docs/benchmarks.md
    python scripts/bench_ppo_memory.py --no-doc  # print the tables only
    python scripts/bench_ppo_memory.py --configs full,lora-shared
    python scripts/bench_ppo_memory.py --size 50m  # the ~50M grid model too (its own table; slower)

One short `align train method=ppo` run per configuration (each in its own process, through the
real `train(compose(...))` path) on bench_ppo.py's ~5M-parameter random-init Qwen2 policy
("5m" of its grid, built offline under .bench/ppo-grid), with a random-init reward model of the
policy's shape (a trained head is not what this measures). Per run:

- the four roles' parameter bytes, read off the trainer after training: the policy (its
  weights and any adapter), the critic (only what it does not share with the policy), the
  reference (0 when it is the policy with its adapter off) and the reward model; a 4-bit
  tensor counts its packed bytes and its quantization constants (absmax);
- resident memory: anonymous (RssAnon) at the start of training and its peak over the loop
  (sampled), file-backed (RssFile: mapped checkpoints) at the start, and the total peak (Linux
  VmHWM) of the training loop (reset when it starts, as bench_ppo.py's Meter does) and of the run.

`method.args.offload_reward_model` is a no-op on a CPU (the reward model is already in CPU
memory), so it has no row here; scripts/bench_gpu.py is where it would show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench" / "ppo-memory"
# The raw results, kept in the repository: the doc section is rebuilt from every size saved here.
RESULTS = ROOT / "docs" / "results" / "ppo-memory.json"

# name -> (what it is, overrides on top of the common ones)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning (critic: a copy of the reward model)", []),
    "full-4bit-frozen": ("full, reference and reward model in 4 bit", ["method.frozen_quant=4bit"]),
    "lora": ("LoRA policy, LoRA critic on its own base", ["peft=lora"]),
    "lora-shared": ("LoRA, critic shares the policy's base", ["peft=lora", "method.critic=shared"]),
    "lora-shared-4bit-frozen": (
        "LoRA, shared critic, 4-bit reward model",
        ["peft=lora", "method.critic=shared", "method.frozen_quant=4bit"],
    ),
    "qlora-shared-4bit-frozen": (
        "QLoRA (4-bit base), shared critic, 4-bit reward model",
        ["peft=lora", "quant=4bit", "method.critic=shared", "method.frozen_quant=4bit"],
    ),
}


def common_overrides(models: dict, steps: int) -> list[str]:
    return [
        "method=ppo",
        f"model.name_or_path={models['policy']}",
        "reward=model",
        f"reward.model.path={models['reward']}",
        "peft.r=16",
        "peft.alpha=32",
        f"method.args.max_steps={steps}",
        "method.args.per_device_train_batch_size=8",
        "method.args.num_mini_batches=2",
        "method.args.num_ppo_epochs=2",
        "method.args.max_new_tokens=32",
        "method.args.save_strategy=no",
        "method.args.disable_tqdm=true",
        "data.eval_ratio=0",
        "plot=false",
    ]


def tensor_bytes(tensor) -> int:
    """Storage of one parameter: a bitsandbytes 4-bit one adds its quantization constants."""
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        absmax = getattr(state, "absmax", None)
        size += absmax.numel() * absmax.element_size() if absmax is not None else 0
        state = getattr(state, "state2", None)
    return size


def role_bytes(trainer) -> dict:
    """Bytes of parameters per role; the critic and reference count only what the policy does not hold."""
    policy = {p.data_ptr(): tensor_bytes(p) for p in trainer.policy.parameters()}

    def own(module) -> int:
        if module is None:
            return 0
        seen = {p.data_ptr(): tensor_bytes(p) for p in module.parameters() if p.data_ptr() not in policy}
        return sum(seen.values())

    reward = sum(own(f.model) for f in trainer.reward_funcs if hasattr(f, "model"))
    trainable = sum(tensor_bytes(p) for p in trainer.model.parameters() if p.requires_grad)
    return {
        "policy": sum(policy.values()),
        "critic": own(trainer.critic),
        "reference": own(trainer.ref_model),
        "reward": reward,
        "trainable": trainable,
    }


def child(overrides: list[str], out: str) -> dict:
    """One run in this process: the roles' bytes and the peak resident memory."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    import ctypes
    import ctypes.util

    import torch
    from bench_ppo import Meter

    torch.set_num_threads(1)
    import align_cli.ppo.trainer as impl
    from align_cli.testing import compose
    from align_cli.train import train

    meter = Meter("cpu")
    anon = AnonPeak()
    train_loop = impl.PPOTrainer.train

    def measured(self, *args, **kwargs):
        # Loading frees large buffers (a 4-bit model is quantized from a full-precision load) that
        # glibc keeps mapped; returning them first makes the training loop's figures live memory.
        trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
        if trim is not None:
            trim(0)
        meter.start()
        anon.start()
        try:
            return train_loop(self, *args, **kwargs)
        finally:
            meter.result = {**meter.stop(), **anon.stop()}

    impl.PPOTrainer.train = measured
    result = train(compose(overrides, out))
    return {"roles": role_bytes(result.trainer), "rss_start_mb": meter.rss_start / 2**20, **meter.result}


def status_mb(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1]) / 1024
    return out


class AnonPeak:
    """Peak anonymous resident memory (RssAnon) over the training loop, sampled every 5 ms.

    VmHWM also counts file-backed pages: transformers maps a float32 safetensors file and uses its
    pages as the weights of a frozen model (no private copy), and a 4-bit load reads the whole
    file through that map. Those pages are the page cache's (shared, dropped under pressure);
    RssAnon is what the process itself allocated.
    """

    def start(self) -> None:
        import threading

        self.at_start = status_mb("RssAnon", "RssFile")
        self.peak = self.at_start["RssAnon"]
        self.running = True

        def poll():
            while self.running:
                self.peak = max(self.peak, status_mb("RssAnon")["RssAnon"])
                time.sleep(0.005)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {
            "anon_start_mb": self.at_start["RssAnon"],
            "file_start_mb": self.at_start["RssFile"],
            "anon_peak_mb": max(self.peak, status_mb("RssAnon")["RssAnon"]),
        }


def run_config(name: str, models: dict, steps: int, size: str) -> dict:
    out = WORK / "runs" / f"{size}-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder each time
    overrides = common_overrides(models, steps) + CONFIGS[name][1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # A fixed mmap threshold: glibc then returns large freed blocks to the OS at once, so the
    # resident memory follows the live tensors instead of the allocator's history.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", json.dumps({"overrides": overrides, "out": str(out)})]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench-ppo-memory: {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


ROLES = ("policy", "critic", "reference", "reward")


def table(results: dict) -> list[str]:
    lines = [
        "| configuration | options | policy MB | critic MB | reference MB | reward MB | four roles MB "
        "| trainable MB | anon RSS MB at training start | peak anon RSS MB, training | file RSS MB at start "
        "| peak RSS MB (VmHWM), training | peak RSS MB, whole run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        roles = r["roles"]
        options = " ".join(f"`{o}`" for o in CONFIGS[name][1]) or "(defaults)"
        lines.append(
            f"| {CONFIGS[name][0]} | {options} | {mb(roles['policy'])} | {mb(roles['critic'])} | "
            f"{mb(roles['reference'])} | {mb(roles['reward'])} | **{mb(sum(roles[k] for k in ROLES))}** | "
            f"{mb(roles['trainable'])} | {r['anon_start_mb']:.0f} | **{r['anon_peak_mb']:.0f}** | "
            f"{r['file_start_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['process_peak_rss_mb']:.0f} |"
        )
    return lines


def signed(x: float) -> str:
    return f"{round(x):+d}"


def comparisons(results: dict) -> list[str]:
    """Sentences comparing the options with their baselines, from the measured figures."""

    def roles(name: str) -> float:
        return sum(results[name]["roles"][k] for k in ROLES)

    out = []
    if "full" in results:
        best = min(results, key=roles)
        out.append(
            f"The four roles: {mb(roles('full'))} MB with full fine-tuning, {mb(roles(best))} MB "
            f"({roles(best) / roles('full'):.2f}x) for {CONFIGS[best][0]}."
        )
    pairs = [
        ("lora-shared", "lora", "the shared critic vs its own base"),
        ("full-4bit-frozen", "full", "4-bit frozen roles vs full precision"),
    ]
    for option, base, what in pairs:
        if option in results and base in results:
            a, b = results[option], results[base]
            out.append(
                f"{what.capitalize()}: roles {mb(roles(option) - roles(base))} MB, peak anon RSS "
                f"{signed(a['anon_peak_mb'] - b['anon_peak_mb'])} MB, file RSS at start "
                f"{signed(a['file_start_mb'] - b['file_start_mb'])} MB, VmHWM in training "
                f"{signed(a['peak_rss_mb'] - b['peak_rss_mb'])} MB."
            )
    return ["", " ".join(out)] if out else []


def markdown(saved: dict) -> str:
    """The doc section from every size saved in docs/results/ppo-memory.json."""
    lines = [
        "## PPO memory: the four roles and the cheap options",
        "",
        "Reproduce: `python3 scripts/bench_ppo_memory.py` (5m: about 2 minutes on one core; part of `make bench`; "
        "`--size 50m` adds the ~50M model's table: some 15 minutes). One short `align train method=ppo` run per configuration, "
        "each its own process, on bench_ppo.py's random-init Qwen2 grid policy (float32, 1,024-token "
        "vocabulary) with a random-init reward model of the same shape (`reward=model`; the critic starts from "
        "it unless it is shared), 16 prompts per rollout, 32 new tokens, 2 PPO epochs of 2 mini-batches, LoRA "
        "r 16 on the default target modules where on, one thread.",
        "",
        "Columns: the four roles, MB of parameters each (the critic and the reference count only tensors the "
        "policy does not already hold; a 4-bit tensor counts its packed bytes and its quantization constants); "
        "the trainable MB (AdamW keeps 2 x that beside them); then the process's memory. Anonymous resident "
        "memory (RssAnon: what the process allocated) when training starts (models loaded; glibc's freed "
        "loading buffers returned first, and a fixed mmap threshold so it returns large blocks at once) and its "
        "peak over the training loop (sampled every 5 ms): the figure that follows the options. File-backed "
        "resident memory at the start: transformers maps each float32 safetensors file and uses its pages as a "
        "frozen model's weights (no private copy on a CPU), and a 4-bit load reads the whole file through that "
        "map, so these pages (the page cache's, shared and reclaimable) grow with the 4-bit options here, where "
        "a GPU would hold the weights in its own memory. Last, the total peak (VmHWM, file pages included) over "
        "the training loop and over the whole run (imports and loading included).",
    ]
    for size, entry in saved.items():
        results = entry["results"]
        lines += ["", f"### {size}: {entry['params'] / 1e6:.2f}M parameters, {entry['steps']} PPO steps", ""]
        lines += table(results)
        lines += comparisons(results)
        lines += ["", f"Machine: {entry['machine']}."]
    lines += [
        "",
        "Reading the figures. The roles' MB are what an accelerator holds (each role's weights in device "
        "memory); that is where these options are for. On this CPU the resident memory says less, for three "
        "reasons: (1) a frozen float32 model loaded from safetensors is not copied: its weights are pages of the "
        "mapped file (file RSS: the page cache's, shared and dropped under pressure), faulted in when first "
        "read, so mostly after the start and counted by VmHWM; a LoRA base is frozen too, so sharing the "
        "critic's base shows in VmHWM (by the critic's whole base), not in anonymous memory; "
        "(2) a 4-bit role is a private (anonymous) copy, and its load reads the whole file through the map, so "
        "4-bit frozen roles save anonymous memory only where the full-precision role was a private copy (the "
        "reference of a full fine-tuning run: a deep copy of the policy); (3) the process's fixed cost (the "
        "interpreter, torch, transformers, bitsandbytes) and the training loop's own growth (activations, "
        "gradients, AdamW state: it follows the trainable MB) come on top, and at 5M parameters dwarf the roles. "
        "`method.args.offload_reward_model=true` keeps the reward model in CPU memory and moves it to the "
        "accelerator only while it scores; on a CPU it is a no-op (said in the log), so it has no row here.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {','.join(CONFIGS)}")
    parser.add_argument("--size", default="5m", choices=["5m", "50m"], help="bench_ppo.py grid model")
    parser.add_argument("--steps", type=int, default=2, help="PPO steps per run")
    parser.add_argument(
        "--no-doc", action="store_true", help="print the tables, leave docs/benchmarks.md alone"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the section from docs/results/ppo-memory.json"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = child(spec["overrides"], spec["out"])
        print(json.dumps(result))
        return result
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"bench-ppo-memory: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import machine_info, update_section
    from bench_ppo import grid_models

    path = RESULTS
    if args.report_only:
        section = markdown(json.loads(path.read_text()))
        print(section)
        if not args.no_doc:
            update_section("ppo-memory", section)
        return {}

    models = grid_models(args.size)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        results[name] = r = run_config(name, models, args.steps, args.size)
        roles = ", ".join(f"{k} {mb(v)}" for k, v in r["roles"].items())
        print(
            f"bench-ppo-memory: {args.size} {name}: MB {roles}; anon RSS {r['anon_start_mb']:.0f} -> peak "
            f"{r['anon_peak_mb']:.0f} MB, file RSS {r['file_start_mb']:.0f} MB; "
            f"RSS {r['rss_start_mb']:.0f} MB at training start, "
            f"peak {r['peak_rss_mb']:.0f} MB in training, {r['process_peak_rss_mb']:.0f} MB over the run",
            flush=True,
        )
    saved = json.loads(path.read_text()) if path.exists() else {}
    machine = machine_info(("torch", "transformers", "peft", "bitsandbytes"))
    # The runs replace their own rows; the other configurations' rows of this size (same steps) stay.
    old = saved.get(args.size, {})
    kept = old.get("results", {}) if old.get("steps") == args.steps else {}
    merged = {n: results.get(n, kept.get(n)) for n in CONFIGS if n in results or n in kept}
    saved[args.size] = {
        "params": models["params"],
        "steps": args.steps,
        "machine": machine,
        "results": merged,
    }
    saved = {k: saved[k] for k in ("5m", "50m") if k in saved}
    path.write_text(json.dumps(saved, indent=1))
    section = markdown(saved)
    print(section)
    if not args.no_doc:
        update_section("ppo-memory", section)
    return results


if __name__ == "__main__":
    main()
