"""Thin-adapter benchmark: `align train` against the same training written directly on TRL.

    python3 scripts/bench_adapter.py                      # sft, dpo, kto; 5 rounds each
    python3 scripts/bench_adapter.py --methods dpo --rounds 5 --no-doc
    python3 scripts/bench_adapter.py --methods grpo --rounds 6 --steps 30   # its own doc section

GRPO: align runs `method=grpo reward=length reward.length.target=40`; the TRL side passes
GRPOTrainer a length reward written out in DIRECT_SCRIPT (1 - |characters - 40| / 40), the
same rule, so both sides sample, score and train alike (the logged-curve check holds them to it).

For each method, both sides train the same tiny model folder on the same rows with the same
TRL config values, as separate processes, alternating in ABBA order (align, TRL, TRL, align, ...):

- align: `python -m align_cli.cli train method=<m> model.name_or_path=<folder> ...`, the real
  command (composition, data conversion, run folder, summary and plot included).
- TRL: DIRECT_SCRIPT below, written to a temporary file. It imports nothing from align: it
  reads align's converted rows from JSONL with `datasets`, loads the model folder with
  transformers, builds SFTConfig/DPOConfig/KTOConfig from the values a warm-up align run
  saved in its `training_args.bin` (every value that differs from the class default, except
  output_dir), and calls SFTTrainer/DPOTrainer/KTOTrainer, evaluate and save_model.

Honesty checks (the run stops if one fails): the TRL side's saved config equals align's
field for field (output paths aside), and both sides log the same training curve (the training
loss, and every logged step's loss, reward, completion length and gradient norm).

Reported per method, median per side: training-loop throughput (samples/s over the time
spent in Trainer.train(); transformers' `train_samples_per_second`) and its ratio align/TRL;
whole-process wall time and start-up (wall time minus the training loop), and the difference.
Both are also given in CPU time (samples per CPU-second; process CPU time minus the loop's),
which other jobs on a shared machine disturb far less than wall-clock time. Targets: ratio
>= 0.97 and at most 1 s of extra start-up. The table goes to stdout and to the `adapter`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's align_cli, not an installed copy

from bench import machine_info, update_section  # noqa: E402  (scripts/ is on sys.path)

# method -> (trainer class, config class) in trl.
TRL_CLASSES = {
    "sft": ("SFTTrainer", "SFTConfig"),
    "dpo": ("DPOTrainer", "DPOConfig"),
    "kto": ("KTOTrainer", "KTOConfig"),
    "grpo": ("GRPOTrainer", "GRPOConfig"),
}
# Enough steps that the training loop (~4-5 s each on one idle core) outweighs per-run fixed
# costs, few enough that 5 rounds (3 methods x 11 processes) take about 6-7 minutes on 2 cores:
# on a shared machine, more runs per side beat longer ones.
DEFAULT_STEPS = {"sft": 120, "dpo": 50, "kto": 60, "grpo": 30}
# GRPO's reward on both sides: align's `reward=length` (its default target, in characters), and
# on the TRL side the same rule written out in DIRECT_SCRIPT.
GRPO_REWARD = {"type": "length", "target": 40}
RATIO_TARGET = 0.97
# Logged per step by the trainers and compared between paired runs (with the training loss).
TRAJECTORY_KEYS = ("loss", "reward", "completions/mean_length", "grad_norm")
STARTUP_TARGET_S = 1.0

DIRECT_SCRIPT = '''\
"""The training that `align train` runs, written directly against TRL (nothing from align).

    python direct.py spec.json
"""
import json
import sys

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

with open(sys.argv[1], encoding="utf-8") as f:
    spec = json.load(f)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])


tokenizer = AutoTokenizer.from_pretrained(spec["model"])
train_dataset = read_jsonl(spec["train"])
eval_dataset = read_jsonl(spec["eval"]) if spec["eval"] else None
set_seed(spec["seed"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
args = getattr(trl, spec["config"])(output_dir=spec["output_dir"], **spec["args"])
extra = {}
if spec.get("reward"):  # GRPO: the length reward, 1 - |characters - target| / target
    target = spec["reward"]["target"]

    def length(prompts, completions, **kwargs):
        texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
        return [1.0 - abs(len(t) - target) / target for t in texts]

    extra["reward_funcs"] = [length]
trainer = getattr(trl, spec["trainer"])(
    model=model,
    args=args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    processing_class=tokenizer,
    **extra,
)
trainer.train()
if eval_dataset is not None:
    trainer.evaluate()
trainer.save_model(spec["output_dir"])
tokenizer.save_pretrained(spec["output_dir"])
'''

# Both sides run under this launcher: `python timer.py -m align_cli.cli train ...` is exactly
# `python -m align_cli.cli train ...`, and `python timer.py direct.py spec.json` is
# `python direct.py spec.json`, except that Trainer.train() is timed in wall-clock and CPU
# time (CPU time moves less when other jobs share the cores), and so is align's own code: the
# plot after it, and inside it align's callbacks and the loss guard's training_step wrapper. Each module is wrapped when the program itself first imports it, so
# import order and cost are untouched.
TIMER_SCRIPT = """\
import atexit
import functools
import importlib.abc
import importlib.util
import json
import os
import runpy
import sys
import time

times = {"calls": 0, "plot_cpu_s": 0.0, "plot_wall_s": 0.0, "own_loop_cpu_s": 0.0, "step_wall_s": []}
in_loop = False


# fn, adding (sign=1) or taking away (sign=-1) its CPU time in the loop to own_loop_cpu_s.
def timed(fn, sign):
    def call(*args, **kwargs):
        cpu = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if in_loop:
                times["own_loop_cpu_s"] += sign * (time.process_time() - cpu)

    return call


# Counts align's code in the loop: its callbacks' events, its training_step wrapper and (GRPO)
# its reward functions (the whole call: align's wrapper, the collapse watch's batch metrics and the
# rule itself, which the TRL side also computes, in about 10 microseconds).
def time_align_code(trainer):
    funcs = getattr(trainer, "reward_funcs", None) or []
    for i, func in enumerate(funcs):
        if type(func).__module__.startswith("align_cli"):
            funcs[i] = functools.wraps(func, updated=())(timed(func, 1))
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__module__.startswith("align_cli"):
            for name in vars(type(callback)):
                if name.startswith("on_"):  # an instance attribute shadows the method
                    setattr(callback, name, timed(getattr(callback, name), 1))
    step = trainer.__dict__.get("training_step")
    if step is not None and getattr(step, "__module__", "").startswith("align_cli"):
        # The wrapper's own time is its time minus that of the training_step it wraps.
        for cell in step.__closure__ or ():
            inner = cell.cell_contents
            if getattr(inner, "__name__", None) == "training_step":
                cell.cell_contents = timed(inner, -1)
        trainer.training_step = timed(step, 1)


def wrap_trainer(module):
    original = module.Trainer.train

    def train(self, *args, **kwargs):
        global in_loop
        time_align_code(self)
        # Each training_step call's wall time (align's wrapper included; GRPO generates inside it):
        # its median moves far less than the loop's total when other jobs take the core for a while.
        step = self.training_step

        def training_step(*args, **kwargs):
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                times["step_wall_s"].append(time.perf_counter() - started)

        self.training_step = training_step
        cpu, wall = time.process_time(), time.perf_counter()
        in_loop = True
        output = original(self, *args, **kwargs)
        in_loop = False
        times.update(
            loop_cpu_s=time.process_time() - cpu,
            loop_wall_s=time.perf_counter() - wall,
            samples=self.state.global_step
            * self.args.train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size,
            metrics=output.metrics,
            calls=times["calls"] + 1,
            log_history=[
                {k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in self.state.log_history
            ],
        )
        return output

    module.Trainer.train = train


def wrap_plot(module):
    plot = module.plot_metrics

    def plot_metrics(*args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return plot(*args, **kwargs)
        finally:
            times["plot_cpu_s"] += time.process_time() - cpu
            times["plot_wall_s"] += time.perf_counter() - wall

    module.plot_metrics = plot_metrics


WRAPPERS = {"transformers.trainer": wrap_trainer, "align_cli.plot": wrap_plot}


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        wrapper = WRAPPERS.pop(name, None)
        if wrapper is None:
            return None
        spec = importlib.util.find_spec(name)  # the usual finders (this name is no longer ours)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            wrapper(module)

        spec.loader.exec_module = exec_module
        return spec


@atexit.register
def report():
    with open(os.environ["BENCH_TIMES"], "w", encoding="utf-8") as f:
        json.dump(times, f)


sys.meta_path.insert(0, Hook())
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Run:
    """One process of one side: whole-process and training-loop times."""

    side: str  # "align" | "trl"
    wall_s: float  # the whole process, interpreter start to exit
    cpu_s: float  # user + system CPU time of the whole process
    loop_wall_s: float  # inside Trainer.train()
    loop_cpu_s: float
    samples: int  # trained in the loop: steps x batch size
    samples_per_s: float  # transformers' train_samples_per_second
    train_loss: float
    plot_s: float  # align's training-curves plot (part of its start-up); 0 for TRL
    plot_cpu_s: float
    own_loop_cpu_s: float  # align's code inside the loop (callbacks, loss guard, GRPO rewards); 0 for TRL
    step_wall_s: list[float]  # each training_step call, in order
    log_history: list[dict]  # the trainer's logged entries (numbers only)
    steal_s: float | None = None  # the host's steal time on this machine's CPUs during the run

    @property
    def step_median_s(self) -> float:
        """The median training_step call (the first, which warms up, left out)."""
        steps = self.step_wall_s[1:] or self.step_wall_s
        return statistics.median(steps)

    @property
    def own_loop_share(self) -> float:
        return self.own_loop_cpu_s / self.loop_cpu_s

    @property
    def samples_per_cpu_s(self) -> float:
        return self.samples / self.loop_cpu_s

    @property
    def startup_s(self) -> float:
        """Everything but the training loop: interpreter, imports, config, data, model, eval, save, exit."""
        return self.wall_s - self.loop_wall_s

    @property
    def startup_cpu_s(self) -> float:
        return self.cpu_s - self.loop_cpu_s


def steal_s() -> float | None:
    """CPU time the hypervisor gave other guests while this machine's CPUs wanted it ("steal" in
    /proc/stat, all CPUs), in seconds since boot; None where the kernel does not report it."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class BenchError(RuntimeError):
    """A run failed or a check did not hold; the message says which."""


def run_side(side: str, args: list[str], out: Path, work: Path, env: dict[str, str]) -> Run:
    """Runs one side under the timer to completion and collects its times."""
    times_path = out.with_suffix(".times.json")
    cmd = [sys.executable, str(work / "timer.py"), *args]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    stolen = steal_s()
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "BENCH_TIMES": str(times_path)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    stolen_after = steal_s()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the runs are sequential: this one's usage
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
        raise BenchError(
            f"{side} run failed (exit {proc.returncode}): {' '.join(cmd)}\n--- output tail ---\n{tail}"
        )
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if times.get("calls") != 1:
        raise BenchError(
            f"{side} run: expected one Trainer.train() call, saw {times.get('calls')}: {' '.join(cmd)}"
        )
    metrics = times["metrics"]
    return Run(
        side=side,
        wall_s=wall,
        cpu_s=(after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        loop_wall_s=times["loop_wall_s"],
        loop_cpu_s=times["loop_cpu_s"],
        samples=times["samples"],
        samples_per_s=metrics["train_samples_per_second"],
        train_loss=metrics["train_loss"],
        plot_s=times["plot_wall_s"],
        plot_cpu_s=times["plot_cpu_s"],
        own_loop_cpu_s=times["own_loop_cpu_s"],
        step_wall_s=times["step_wall_s"],
        log_history=times["log_history"],
        steal_s=None if stolen is None or stolen_after is None else stolen_after - stolen,
    )


def child_env(threads: int, cache: Path) -> dict[str, str]:
    """The environment both sides run in: same threads, offline, this checkout first on the path.

    glibc's malloc thresholds are fixed for both sides. By default glibc moves its mmap
    threshold as a process frees large blocks, so how often a tensor's memory comes fresh from
    the kernel (a page fault per 4 KiB) depends on everything the process did before training.
    Measured here: 260k to 540k minor page faults in the same 120-step SFT loop in otherwise
    identical processes, and about 10% of its time. Fixed thresholds make both sides allocate
    the same way (about 25k faults), so the ratio measures the two programs, not that.
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        MALLOC_MMAP_THRESHOLD_=str(256 << 20),
        MALLOC_TRIM_THRESHOLD_=str(1 << 30),
        ALIGN_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def align_overrides(method: str, model_path: Path, steps: int) -> list[str]:
    out = [f"method={method}", f"model.name_or_path={model_path}", f"method.args.max_steps={steps}"]
    if method == "grpo":
        out += [f"reward={GRPO_REWARD['type']}", f"reward.length.target={GRPO_REWARD['target']}"]
    return out


def align_args(method: str, model_path: Path, steps: int, out: Path) -> list[str]:
    """`python -m align_cli.cli train ...`: the real command, its run folder at `out`."""
    return [
        "-m",
        "align_cli.cli",
        "train",
        *align_overrides(method, model_path, steps),
        f"hydra.run.dir={out}",
    ]


def export_data(method: str, model_path: Path, steps: int, work: Path) -> dict:
    """Writes the rows `align train` trains and evaluates on, converted by align's data layer."""

    from align_cli import config as schema
    from align_cli.data import load_datasets
    from align_cli.data.fit import PromptRoom
    from align_cli.modeling import load_tokenizer
    from align_cli.run_checks import typed
    from align_cli.testing import compose

    cfg = compose(align_overrides(method, model_path, steps))
    model_cfg = typed(cfg, "model", schema.ModelConfig)
    method_cfg = schema.method_settings(cfg.method)
    tokenizer = load_tokenizer(model_cfg)
    # The same call train.py makes; if the two ever drift apart, the loss check fails.
    train, evaluation = load_datasets(
        typed(cfg, "data", schema.DataConfig),
        method_cfg["dataset_type"],
        conversational=tokenizer.chat_template is not None,
        seed=int(cfg.seed),
        sample=method_cfg.get("sample"),
        tokenizer=tokenizer,
        room=PromptRoom.for_answer(model_cfg.max_length),
    )
    if method == "kto":  # the order align's KTO trains in (KTOTrainer reads rows in order)
        from align_cli.methods.kto import training_order

        strategy = cfg.method.args.get("train_sampling_strategy", "sequential")
        train = training_order(train, strategy, int(cfg.seed))
    paths = {}
    for name, ds in (("train", train), ("eval", evaluation)):
        if ds is None:
            paths[name] = None
            continue
        paths[name] = str(work / f"{method}-{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            for row in ds:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {**paths, "seed": int(cfg.seed), "dtype": model_cfg.dtype, "rows": len(train)}


def config_kwargs(training_args_bin: Path, config_name: str) -> dict:
    """The config values an align run used: every field that differs from the class default."""
    import dataclasses

    import torch
    import trl

    cls = getattr(trl, config_name)
    saved = torch.load(training_args_bin, weights_only=False)
    as_json = saved.to_dict()  # enums as their values, nested configs as dicts
    out = {}
    # GRPOConfig derives generation_batch_size from steps_per_generation in __post_init__ and
    # refuses both given; the check that the saved configs match covers it.
    derived = {"generation_batch_size"} if config_name == "GRPOConfig" else set()
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("output_dir", "logging_dir") or f.name in derived:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if getattr(saved, f.name) != default:
            out[f.name] = as_json[f.name]
    return out


def check_same_config(align_dir: Path, trl_dir: Path) -> None:
    """Both sides' saved configs must be equal field by field, except fields naming their folders
    and align's own options (a field TRL's config lacks, e.g. GRPO's ptx_coef) left at their default."""
    import dataclasses

    import torch

    saved = torch.load(align_dir / "training_args.bin", weights_only=False)
    a = saved.to_dict()
    b = torch.load(trl_dir / "training_args.bin", weights_only=False).to_dict()
    own_defaults = {
        f.name: f.default for f in dataclasses.fields(type(saved)) if f.default is not dataclasses.MISSING
    }
    differ = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        names_folder = (
            isinstance(va, str) and str(align_dir) in va and isinstance(vb, str) and str(trl_dir) in vb
        )
        align_only_off = key not in b and key in own_defaults and va == own_defaults[key]
        if va != vb and not names_folder and not align_only_off:
            differ.append(f"{key}: align={va!r} trl={vb!r}")
    if differ:
        raise BenchError("the TRL side's config differs from align's:\n  " + "\n  ".join(differ))


@dataclass
class Result:
    method: str
    steps: int
    rows: int
    runs: list[Run]

    def side(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.side == name]

    def median(self, name: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.side(name))

    def ratio(self, attr: str = "samples_per_s") -> float:
        return self.median("align", attr) / self.median("trl", attr)

    def extra(self, attr: str = "startup_s") -> float:
        return self.median("align", attr) - self.median("trl", attr)

    def step_ratio(self) -> float:
        """TRL's median training step over align's (above 1: align's steps are shorter)."""
        return self.median("trl", "step_median_s") / self.median("align", "step_median_s")

    def floor_s(self, name: str) -> float:
        """The sum over training steps (the first left out) of each step's fastest run on this side.

        Both sides take the same steps on the same data (`loss_gap` holds them to it), so step i is
        the same work in every run of either side. Other jobs, and the host's other guests, can only
        make a step slower; the fastest of several runs of step i is the closest to its own cost."""
        runs = [r.step_wall_s for r in self.side(name)]
        steps = min(len(s) for s in runs)
        return sum(min(s[i] for s in runs) for i in range(1 if steps > 1 else 0, steps))

    def floor_ratio(self) -> float:
        """TRL's step floor over align's (above 1: align's steps are shorter)."""
        return self.floor_s("trl") / self.floor_s("align")

    @property
    def loss_gap(self) -> float:
        """The largest gap between paired runs in the training loss and in every logged step's
        TRAJECTORY_KEYS (GRPO's loss is about 0 by construction; its rewards and completion
        lengths show whether both sides sampled the same completions)."""
        pairs = list(zip(self.side("align"), self.side("trl"), strict=True))
        gaps = [abs(a.train_loss - t.train_loss) for a, t in pairs]
        for a, t in pairs:
            steps_a = [x for x in a.log_history if "loss" in x]
            steps_t = [y for y in t.log_history if "loss" in y]
            if [x.get("step") for x in steps_a] != [y.get("step") for y in steps_t]:
                return float("inf")  # the two sides logged different steps
            for x, y in zip(steps_a, steps_t, strict=True):
                gaps += [abs(x[k] - y[k]) for k in TRAJECTORY_KEYS if k in x and k in y]
        return max(gaps)


def bench_method(
    method: str, steps: int, rounds: int, model_path: Path, work: Path, env: dict, log
) -> Result:
    data = export_data(method, model_path, steps, work)
    # Warm-up, not counted: fills the file cache for both sides (they import the same
    # libraries) and saves the TRL config values align ends up using.
    warm = work / f"{method}-warmup"
    run_side("align", align_args(method, model_path, steps, warm), warm, work, env)
    trainer_name, config_name = TRL_CLASSES[method]
    spec = {
        "model": str(model_path),
        "train": data["train"],
        "eval": data["eval"],
        "seed": data["seed"],
        "dtype": data["dtype"],
        "trainer": trainer_name,
        "config": config_name,
        "args": config_kwargs(warm / "training_args.bin", config_name),
        "reward": GRPO_REWARD if method == "grpo" else None,
    }
    log(f"{method}: {data['rows']} train rows, {steps} steps; TRL side: {config_name}(**{spec['args']})")

    runs = []
    for i in range(rounds):
        # ABBA order: neither side always runs right after the other's process.
        for side in ("align", "trl") if i % 2 == 0 else ("trl", "align"):
            out = work / f"{method}-{side}-{i}"
            if side == "align":
                args = align_args(method, model_path, steps, out)
            else:
                spec_path = out.with_suffix(".json")
                spec_path.write_text(json.dumps({**spec, "output_dir": str(out)}, indent=1), encoding="utf-8")
                args = [str(work / "direct.py"), str(spec_path)]
            run = run_side(side, args, out, work, env)
            if side == "trl" and i == 0:
                check_same_config(work / f"{method}-align-0", out)
            runs.append(run)
            log(
                f"{method} {i + 1}/{rounds} {side:<5}: wall {run.wall_s:5.1f} s, loop {run.loop_wall_s:5.2f} s, "
                f"{run.samples_per_s:6.1f} samples/s, {run.samples_per_cpu_s:6.1f} samples/CPU-s, "
                f"step {run.step_median_s * 1e3:6.1f} ms, "
                f"start-up {run.startup_s:5.2f} s ({run.startup_cpu_s:5.2f} CPU-s; plot {run.plot_cpu_s:4.2f}), "
                f"loss {run.train_loss:.4f}"
            )
    result = Result(method, steps, data["rows"], runs)
    if result.loss_gap > 1e-4:
        raise BenchError(
            f"{method}: align and TRL log different training curves (loss, reward, completion length or "
            f"gradient norm; gap {result.loss_gap:.2e}): they are not running the same training"
        )
    return result


def _verdict(results: list[Result], value, ok, fmt: str) -> str:
    """'met', or 'not met for <method> (<value>)' naming each method that misses the target."""
    missed = [f"{r.method} ({format(value(r), fmt)})" for r in results if not ok(value(r))]
    return "met" if not missed else f"**not met** for {', '.join(missed)}"


def render(results: list[Result], rounds: int, threads: int, elapsed_s: float) -> str:
    def ratio_ok(x: float) -> bool:
        return x >= RATIO_TARGET

    def startup_ok(x: float) -> bool:
        return x <= STARTUP_TARGET_S

    verdicts = [
        f"- throughput ratio >= {RATIO_TARGET}: "
        f"{_verdict(results, lambda r: r.ratio(), ratio_ok, '.4f')} (wall clock); "
        f"{_verdict(results, lambda r: r.ratio('samples_per_cpu_s'), ratio_ok, '.4f')} (CPU time); "
        f"{_verdict(results, lambda r: r.step_ratio(), ratio_ok, '.4f')} (median training step); "
        f"{_verdict(results, lambda r: r.floor_ratio(), ratio_ok, '.4f')} (step floor).",
        f"- extra start-up <= {STARTUP_TARGET_S:.0f} s: "
        f"{_verdict(results, lambda r: r.extra(), startup_ok, '+.2f')} (wall clock); "
        f"{_verdict(results, lambda r: r.extra('startup_cpu_s'), startup_ok, '+.2f')} (CPU time).",
    ]
    grpo_only = [r.method for r in results] == ["grpo"]
    if grpo_only:
        head = [
            "## Thin adapter, GRPO: `align train method=grpo` vs the same training on TRL's GRPOTrainer",
            "",
            f"Reproduce: `python3 scripts/bench_adapter.py --methods grpo --rounds {rounds} --steps {results[0].steps}`",
            f"(writes this section only; {threads} thread(s) per process, {elapsed_s / 60:.1f} min in all).",
            "",
            "Same setup as the thin-adapter section (ABBA order, same converted rows, configs equal field by",
            f"field), with the reward: align's `reward={GRPO_REWARD['type']}` (`reward.length.target="
            f"{GRPO_REWARD['target']}`) on one side, on the other the",
            f"same rule written out in the TRL script (1 - |characters - {GRPO_REWARD['target']}| / "
            f"{GRPO_REWARD['target']}) and handed to `GRPOTrainer(reward_funcs=[length])`.",
            "Advantage: `method.advantage=zscore` (TRL's own, the default). GRPO's loss is about 0 by",
            "construction, so the check that both sides ran the same training compares every logged step's",
            "reward, completion length and gradient norm as well (`loss gap`).",
            "",
        ]
    else:
        head = [
            "## Thin adapter: `align train` vs the same training on TRL directly",
            "",
            "Reproduce: `make bench`, or this benchmark alone: `python3 scripts/bench_adapter.py`",
            f"(options `--rounds N`, `--methods sft,dpo`, `--steps N`, `--threads N`; this run: {rounds} rounds,",
            f"{threads} thread(s) per process, {elapsed_s / 60:.1f} min in all).",
            "",
        ]
    lines = [
        *head,
        "For each method, `python -m align_cli.cli train method=<m>` (the real command) and a",
        "standalone script that calls TRL's trainer directly (it imports nothing from align) train",
        "the same tiny model folder on the same converted rows with the same TRL config values",
        "(read from a warm-up align run's `training_args.bin`), as separate processes, alternating",
        "in ABBA order (align, TRL, TRL, align, ...). The TRL script trains, evaluates, and saves the model and",
        "tokenizer; align also composes its Hydra config, converts the data, and writes",
        "metrics.jsonl, summary.json and an SVG plot. The benchmark stops unless both sides' saved",
        "configs are equal field by field and both reach the same training loss (`loss gap`).",
        "Both sides run with the same threads and with glibc's malloc thresholds fixed",
        "(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`): left to glibc's dynamic threshold, the",
        "number of page faults in the same loop depended on each process's history and swung its",
        "speed by about 10% between identical runs (see `child_env` in the script).",
        "",
        "- Training loop: samples per second inside `Trainer.train()` (transformers'",
        "  `train_samples_per_second`), and samples per CPU-second, median per side; ratio = align / TRL.",
        "- Training step: the median wall time of one `training_step` call (the first left out) per run,",
        "  median per side; step ratio = TRL / align. A step is short, so a burst of another job on the",
        "  core spoils few of them.",
        "- Step floor: both sides take the same steps on the same data, so step i is the same work in",
        "  every run. For each step, its fastest run on a side; summed over the steps (the first left",
        "  out), per side; floor ratio = TRL / align. Load from other jobs, or from the host's other",
        "  guests (the kernel's steal time, given per run below), only ever makes a step slower, so the",
        "  floor is the nearest to a step's own cost; but it rests on each side's fastest runs, and when",
        "  the machine's speed changes in phases longer than a run, on one or two of them.",
        "- Start-up: the whole process (wall clock, and CPU time) minus the training loop: interpreter,",
        "  imports, config, data, model loading, final evaluation, saving, exit. Median per side.",
        "",
        "CPU-time figures move less than wall-clock ones when other jobs share the cores, but both",
        "move: the run-by-run figures at the end show by how much. Inside the training loop, align's",
        "own code is its callbacks (metrics.jsonl, the SIGINT/SIGTERM checkpoint, the NaN/inf loss",
        "and gradient guard), the guard's `training_step` wrapper and, under GRPO, its reward functions",
        "(the collapse watch's batch metrics; the timeout guard of user functions and reward models); column `align code in loop`",
        "gives their CPU time and share of the loop. The rest of the loop is TRL's trainer with an",
        "identical config on both sides, so a ratio further from 1 than that share",
        "is timing noise.",
        "",
        "| method | steps | align samples/s | TRL samples/s | ratio | align samples/CPU-s "
        "| TRL samples/CPU-s | CPU ratio | align step ms | TRL step ms | step ratio "
        "| align floor s | TRL floor s | floor ratio | align code in loop | loss gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.steps} | {r.median('align', 'samples_per_s'):.1f} "
            f"| {r.median('trl', 'samples_per_s'):.1f} | {r.ratio():.3f} "
            f"| {r.median('align', 'samples_per_cpu_s'):.1f} | {r.median('trl', 'samples_per_cpu_s'):.1f} "
            f"| {r.ratio('samples_per_cpu_s'):.3f} "
            f"| {r.median('align', 'step_median_s') * 1e3:.1f} | {r.median('trl', 'step_median_s') * 1e3:.1f} "
            f"| {r.step_ratio():.3f} "
            f"| {r.floor_s('align'):.2f} | {r.floor_s('trl'):.2f} | {r.floor_ratio():.3f} "
            f"| {r.median('align', 'own_loop_cpu_s') * 1e3:.1f} ms ({r.median('align', 'own_loop_share'):.2%}) "
            f"| {r.loss_gap:.1e} |"
        )
    lines += [
        "",
        "| method | align wall s | TRL wall s | align start-up s | TRL start-up s | extra start-up s "
        "| of which plot s | align start-up CPU-s | TRL start-up CPU-s | extra CPU-s | of which plot CPU-s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.median('align', 'wall_s'):.2f} | {r.median('trl', 'wall_s'):.2f} "
            f"| {r.median('align', 'startup_s'):.2f} | {r.median('trl', 'startup_s'):.2f} | {r.extra():+.2f} "
            f"| {r.median('align', 'plot_s'):.2f} "
            f"| {r.median('align', 'startup_cpu_s'):.2f} | {r.median('trl', 'startup_cpu_s'):.2f} "
            f"| {r.extra('startup_cpu_s'):+.2f} | {r.median('align', 'plot_cpu_s'):.2f} |"
        )
    lines += [
        "",
        "Targets, on the medians above:",
        "",
        *verdicts,
        "",
        "`align train` imports its libraries and composes its config with Python's cyclic garbage",
        "collector off; from reading the data on it runs again and skips the libraries' objects, frozen",
        "(`align_cli/collector.py`): importing torch, transformers, TRL and peft otherwise runs about 9",
        "full collections over their ~900k objects (1-2 s on one core), and training runs more. The TRL",
        "script runs with Python's defaults.",
        "",
        "Where align's extra start-up goes (profiled with `python -X importtime`, pyinstrument and",
        "timers around align's functions): the training-curves plot every run folder gets, about",
        "0.5 s when it was drawn with matplotlib (now a hand-written SVG; column `of which plot`); Hydra,",
        "about 0.3 s (importing hydra and omegaconf, and composing the config, which Hydra 1.3 does",
        "twice per run: once in `get_mode` to choose run or multirun, once for the run; then writing",
        "`.hydra/`); about 0.1 s for the rest of align (its imports, the TRL-config and prompt-length",
        "checks, data conversion, metrics.jsonl, summary.json, and exiting with more modules loaded).",
        "`plot=false` removes the plot's share.",
        "",
        "Each run, in the order they ran (samples/s, samples/CPU-s, median step ms, start-up s, and the",
        "host's steal time on this machine's CPUs during the run, s):",
        "",
    ]
    for r in results:
        for side, label in (("align", "align"), ("trl", "TRL")):
            runs = "; ".join(
                f"{x.samples_per_s:.0f}, {x.samples_per_cpu_s:.0f}, {x.step_median_s * 1e3:.1f}, {x.startup_s:.2f}, "
                + ("n/a" if x.steal_s is None else f"{x.steal_s:.1f}")
                for x in r.side(side)
            )
            lines.append(f"- {r.method} {label}: {runs}")
    lines += [
        "",
        f"Machine: {machine_info()}.",
        "The machine is shared with other jobs: single wall-clock figures vary by tens of percent",
        "when it is busy, and alternating the sides spreads that over both. Re-run if a figure looks noisy.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sft,dpo,kto", help="comma-separated, from sft,dpo,kto,grpo")
    parser.add_argument("--rounds", type=int, default=5, help="runs per side and method (alternating)")
    parser.add_argument(
        "--steps", type=int, default=None, help="max_steps for every method (default: per method)"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per process (both sides)")
    parser.add_argument(
        "--no-doc", action="store_true", help="print the tables, leave docs/benchmarks.md alone"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (run folders, scripts)")
    opts = parser.parse_args()
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in TRL_CLASSES]
    if unknown or opts.rounds < 1:
        parser.error(
            f"unknown method(s) {unknown}; use sft, dpo, kto, grpo" if unknown else "--rounds must be >= 1"
        )

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    (work / "direct.py").write_text(DIRECT_SCRIPT, encoding="utf-8")
    (work / "timer.py").write_text(TIMER_SCRIPT, encoding="utf-8")
    cache = work / "cache"
    os.environ["ALIGN_CACHE"] = str(cache)  # the tiny model is built here, once, for both sides
    env = child_env(opts.threads, cache)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {message}", flush=True)

    try:
        from align_cli.modeling import build_tiny_model

        model_path = build_tiny_model()
        log(f"work folder {work}; tiny model {model_path}")
        results = [
            bench_method(m, opts.steps or DEFAULT_STEPS[m], opts.rounds, model_path, work, env, log)
            for m in methods
        ]
    except BenchError as err:
        print(f"bench_adapter: {err}", file=sys.stderr)
        print(f"bench_adapter: work folder kept for inspection: {work}", file=sys.stderr)
        return 1
    table = render(results, opts.rounds, opts.threads, time.perf_counter() - started)
    print("\n" + table + "\n")
    if not opts.no_doc:
        # GRPO alone has its own section, so re-measuring it leaves the SFT/DPO/KTO table alone.
        section = "adapter-grpo" if methods == ["grpo"] else "adapter"
        update_section(section, table)
        print(f"bench_adapter: wrote the {section} section of docs/benchmarks.md")
    if opts.keep:
        print(f"bench_adapter: work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
