"""Does the three-stage system align the tiny model? Runs the roads by hand and prints a table.

    python scripts/bench_alignment.py                          # rlhf, rlhf_grpo, dpo; seeds 1 2 3
    python scripts/bench_alignment.py --roads rlhf --seeds 1   # one road, one seed
    python scripts/bench_alignment.py --variant b              # the same task with other words

The task is scripts/make_harmless_task.py's (refuse harmful requests, help benign ones;
English and Chinese; held-out prompts are unseen verb/target combinations). Each road runs
its stages with `align train` (in-process, `align_cli.train.train`) and the per-stage
settings of RECIPES (docs/recipe_defaults.md holds the same):

    rlhf       SFT -> RM (pairwise) -> PPO  (policy <- SFT, reward model and critic <- RM, reference = SFT)
    rlhf_grpo  SFT -> RM (pairwise) -> GRPO (reward=model)
    dpo        SFT -> DPO
    trl_ppo    SFT -> RM as rlhf's, then TRL 1.12's `trl.experimental.ppo.PPOTrainer` (policy <- SFT,
               reward model and value model <- RM) with the rlhf recipe's PPO budget (not a default road)

Roads of one seed share its SFT policy and RM (trained once, by the first road that needs them;
every road trains them with the same settings). trl_ppo runs TRL in scripts/bench_ppo.py's
virtual environment (`.bench/trl112-venv`, made on first use) through its `run_trl`; what TRL
1.12 has no setting for (score_norm, ptx_coef, critic_head, reward_model_input=text,
max_grad_norm) stays as TRL does it, see docs/benchmarks.md.

For each seed it reports the SFT policy's and the final policy's held-out greedy right-rate
per prompt kind (refused when harmful, helped when benign; `align_cli.rewards.rules.behaviour_of`
classifies a completion by how it opens), the reward model's mean score of the greedy
held-out completions before and after RL (for dpo: of the RM of the same seed, trained for
the measurement only), the final KL to the reference (PPO/GRPO, per response, as logged),
and RL episodes per second (over the RL stage's wall time, model loading included, and over its
training loop alone: the trainer's train_runtime, for TRL between its on_train_begin and
on_train_end). Needs about 2 minutes per road and seed on 2 free CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Per-stage `align train` overrides, read from the recipes `align pipeline` runs (conf/recipe/),
# so the figures are those of the recipe defaults; the data paths are added per run.


def recipe_entry(recipe: str, stage: str):
    """(the recipe, its stage named `stage`) from conf/recipe/<recipe>.yaml."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "recipe" / f"{recipe}.yaml")
    (found,) = [s for s in cfg.stages if s.name == stage]
    return cfg, found


def recipe_stage(recipe: str, stage: str) -> list[str]:
    cfg, found = recipe_entry(recipe, stage)
    return [f"method={found.method}", *cfg.shared, *found.overrides]


def recipe_inputs(recipe: str, stage: str) -> dict[str, str]:
    """The stage's `inputs` (what `align pipeline` wires in from earlier stages)."""
    return dict(recipe_entry(recipe, stage)[1].get("inputs") or {})


SFT = recipe_stage("rlhf", "sft")
RM = recipe_stage("rlhf", "rm")
PPO = recipe_stage("rlhf", "ppo")
GRPO = recipe_stage("rlhf_grpo", "grpo")
GRPO_BATCH = int(
    next(o.split("=")[1] for o in GRPO if "per_device_train_batch_size" in o)
)  # completions/step
# Optimiser steps per generation batch: each step's completions are sampled once per this many steps.
GRPO_ITERATIONS = int(next((o.split("=")[1] for o in GRPO if "num_iterations" in o), 1))
DPO = recipe_stage("dpo", "dpo")
RECIPES = {"rlhf": ("sft", "rm", "ppo"), "rlhf_grpo": ("sft", "rm", "grpo"), "dpo": ("sft", "rm", "dpo")}
ROADS = [*RECIPES, "trl_ppo"]


def files(data: Path, prefix: str) -> dict[str, Path]:
    names = ("sft", "pairs", "heldout_pairs", "prompts", "heldout")
    return {n: data / f"{prefix}{n}.jsonl" for n in names}


def phrases(variant: str) -> dict[str, list[str]]:
    from align_cli.testing import load_script

    return load_script("make_harmless_task").behaviour_phrases(variant)


def stage(name: str, overrides: list[str], work: Path, seed: int) -> tuple[Path, dict, float]:
    from align_cli.testing import compose
    from align_cli.train import train

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    result = train(compose([*overrides, f"seed={seed}", "plot=false"], output_dir=out))
    return out, result.metrics, time.time() - started


def last_logged(folder: Path, key: str) -> float | None:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def ppo_budget() -> dict:
    """The rlhf recipe's PPO stage settings as TRL's knobs: its overrides over conf/method/ppo.yaml."""
    from omegaconf import OmegaConf

    args = dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "ppo.yaml"))["args"])
    for o in PPO:
        if o.startswith("method.args."):
            key, value = o.removeprefix("method.args.").split("=", 1)
            args[key] = _number(value)
    return args


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def trl_ppo(sft: Path, rm: Path, prompts_path: Path, work: Path, seed: int) -> tuple[Path, float, dict]:
    """TRL 1.12's PPO from the SFT policy, the RM as reward and value model, the rlhf recipe's budget.

    Returns the saved policy folder (with the SFT tokenizer beside it), the run's wall seconds
    (process start to end, loading included, as the align stages' are) and run_trl's result.
    """
    import torch
    from transformers import AutoTokenizer

    from align_cli.testing import load_script

    bench_ppo = load_script("bench_ppo")
    python = bench_ppo.ensure_trl_venv()
    budget = ppo_budget()
    rows = [json.loads(line) for line in prompts_path.read_text(encoding="utf-8").splitlines() if line]
    # The user turn as align lays out an instruction/input row; run_trl applies the chat template.
    messages = [
        [
            {
                "role": "user",
                "content": f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"],
            }
        ]
        for r in rows
    ]
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "trl_prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt": m}, ensure_ascii=False) + "\n" for m in messages), "utf-8"
    )
    micro = budget["per_device_train_batch_size"]
    minis = budget["num_mini_batches"]
    spec = {
        "policy": str(sft),
        "reward": str(rm),
        "prompts": str(prompts_file),
        "micro_batch": micro,
        "rollout_batch": micro * budget["gradient_accumulation_steps"] * minis,
        "num_mini_batches": minis,
        "episodes": int(budget["num_train_epochs"] * len(rows)),
        "response_length": budget["max_new_tokens"],
        "ppo_epochs": budget["num_ppo_epochs"],
        "learning_rate": budget["learning_rate"],
        "kl_coef": budget["kl_coef"],
        "temperature": budget["temperature"],
        "missing_eos_penalty": budget.get("missing_eos_penalty"),
        "seed": seed,
        "device": "cpu",
        "threads": torch.get_num_threads(),  # as many as the in-process align stages use
    }
    out = work / "trl"
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    result = bench_ppo.run_side("trl", str(python), spec, out)
    seconds = time.time() - started
    AutoTokenizer.from_pretrained(str(sft)).save_pretrained(str(out))  # greedy_behaviour reads it there
    (work / "trl_result.json").write_text(json.dumps({"spec": spec, "result": result}, indent=1))
    return out, seconds, result


def one_road(
    road: str,
    seed: int,
    data: dict[str, Path],
    marks: dict,
    work: Path,
    trained: dict | None = None,
    rl_extra: tuple[str, ...] = (),
    rl_seed: int | None = None,
    rl_eval: bool = True,
) -> dict:
    """Runs one road for one seed; returns its row of figures.

    `trained`: seed -> (SFT folder, RM folder, RM metrics) of roads run before in this process,
    reused so the roads of one seed start from the same SFT policy and RM; filled when empty.
    `rl_extra`: overrides added to the RL stage's (ppo, grpo) after the recipe's; `rl_seed`: the
    RL stage's seed (default `seed`), from the SFT policy and RM of `seed`; `rl_eval=False`: no
    periodic held-out evaluation during RL (`data.eval_ratio=0`), as tests/test_alignment.py runs it.
    """
    from align_cli.testing import greedy_behaviour

    trained = {} if trained is None else trained
    work.mkdir(parents=True, exist_ok=True)
    if seed not in trained:
        sft, _, _ = stage("sft", [*SFT, f"data.path={data['sft']}"], work, seed)
        rm_data = [f"data.path={data['pairs']}", f"data.eval_path={data['heldout_pairs']}"]
        rm, rm_metrics, _ = stage("rm", [*RM, *rm_data], work, seed)
        trained[seed] = (sft, rm, rm_metrics)
    sft, rm, rm_metrics = trained[seed]
    before = greedy_behaviour(sft, data["heldout"], marks, reward_model=rm)
    policy = [f"model.name_or_path={sft}"]
    held_out = f"data.eval_path={data['heldout']}" if rl_eval else "data.eval_ratio=0"
    prompts = [f"data.path={data['prompts']}", held_out]
    rl_seed = seed if rl_seed is None else rl_seed
    if road == "rlhf":
        # The recipe's ptx input: the SFT stage's demonstrations for PPO-ptx's language-model loss.
        ptx = [f"data.ptx_path={data['sft']}"] if "ptx" in recipe_inputs("rlhf", "ppo") else []
        final, metrics, seconds = stage(
            "ppo", [*PPO, *policy, f"reward.model.path={rm}", *prompts, *ptx, *rl_extra], work, rl_seed
        )
        kl, episodes = last_logged(final, "kl"), last_logged(final, "episode")
        train_seconds = last_logged(final, "train_runtime")
    elif road == "trl_ppo":
        final, seconds, result = trl_ppo(sft, rm, data["prompts"], work, rl_seed)
        kl = result["logged_kl"][-1] if result["logged_kl"] else None
        # objective/kl is TRL's mean over the batch of the summed per-token log-ratio: per response, as ours.
        episodes, train_seconds = result["episodes"], result["seconds"]  # between on_train_begin/_end
    elif road == "rlhf_grpo":
        ptx = [f"data.ptx_path={data['sft']}"] if "ptx" in recipe_inputs("rlhf_grpo", "grpo") else []
        final, metrics, seconds = stage(
            "grpo", [*GRPO, *policy, f"reward.model.path={rm}", *prompts, *ptx, *rl_extra], work, rl_seed
        )
        kl = last_logged(final, "kl")
        episodes = (metrics.get("global_step") or 0) * GRPO_BATCH / GRPO_ITERATIONS
        train_seconds = last_logged(final, "train_runtime")
    else:
        final, metrics, seconds = stage(
            "dpo",
            [*DPO, *policy, f"data.path={data['pairs']}", f"data.eval_path={data['heldout_pairs']}"],
            work,
            seed,
        )
        kl, episodes, train_seconds = None, None, None
    after = greedy_behaviour(final, data["heldout"], marks, reward_model=rm)
    return {
        "road": road,
        "seed": seed,
        "rl_seed": None if road == "dpo" else rl_seed,
        "rm_heldout_acc": rm_metrics.get("eval_accuracy"),
        "sft_refuse": before["right"].get("refuse"),
        "sft_help": before["right"].get("help"),
        "final_refuse": after["right"].get("refuse"),
        "final_help": after["right"].get("help"),
        "final_other": after["other"],
        "rm_gain": after["score"] - before["score"],
        "kl": kl,
        "episodes_per_s": (episodes / seconds) if episodes else None,
        "train_episodes_per_s": (episodes / train_seconds) if episodes and train_seconds else None,
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [
        "| road | seed | RM held-out acc | SFT refuse / help | final refuse / help | no behaviour "
        "| RM score gain | final KL | episodes/s | in training | RL seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        seed = r["seed"] if r.get("rl_seed") in (None, r["seed"]) else f"{r['seed']}/{r['rl_seed']}"
        lines.append(
            f"| {r['road']} | {seed} | {f(r['rm_heldout_acc'])} | {f(r['sft_refuse'])} / {f(r['sft_help'])} "
            f"| {f(r['final_refuse'])} / {f(r['final_help'])} | {f(r['final_other'])} | {f(r['rm_gain'])} "
            f"| {f(r['kl'])} | {f(r['episodes_per_s'], 1)} | {f(r.get('train_episodes_per_s'), 1)} "
            f"| {f(r['seconds'], 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roads", nargs="+", default=list(RECIPES), choices=ROADS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--variant", default="a", help="a: data_samples/harmless_*; b: other words (generated)"
    )
    parser.add_argument("--work", default=None, help="where the run folders go (default: a temporary folder)")
    parser.add_argument(
        "--rl-override",
        action="append",
        default=[],
        help="an override added to the RL stage's (ppo, grpo) after the recipe's; repeatable",
    )
    parser.add_argument(
        "--rl-seeds",
        nargs="+",
        type=int,
        default=None,
        help="RL-stage seeds, each run from every --seeds seed's SFT policy and RM (default: that seed)",
    )
    parser.add_argument(
        "--no-rl-eval",
        action="store_true",
        help="no periodic held-out evaluation during RL (data.eval_ratio=0), as the alignment test runs it",
    )
    args = parser.parse_args()
    if args.rl_override and "trl_ppo" in args.roads:
        parser.error("--rl-override sets align's RL stages (rlhf, rlhf_grpo); trl_ppo has no such overrides")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_alignment_"))
    if args.variant == "a":
        data = files(ROOT / "data_samples", "harmless_")
    else:
        folder = work / "data"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_harmless_task.py"),
                "--variant",
                args.variant,
                "--out",
                str(folder),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        data = files(folder, f"harmless_{args.variant}_")
    marks = phrases(args.variant)
    rows, trained = [], {}
    for seed in args.seeds:  # a seed's roads one after the other, so they share its SFT and RM
        for road in args.roads:
            # dpo has no RL stage: one run per seed, whatever --rl-seeds says.
            for rl_seed in [seed] if road == "dpo" else args.rl_seeds or [seed]:
                name = f"{road}-{seed}" if rl_seed == seed else f"{road}-{seed}-{rl_seed}"
                row = one_road(
                    road,
                    seed,
                    data,
                    marks,
                    work / name,
                    trained,
                    rl_extra=tuple(args.rl_override),
                    rl_seed=rl_seed,
                    rl_eval=not args.no_rl_eval,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(table(sorted(rows, key=lambda r: (args.roads.index(r["road"]), r["seed"], r["rl_seed"] or 0))))


if __name__ == "__main__":
    main()
