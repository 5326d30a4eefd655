"""`align pipeline`: a recipe's stages (SFT -> reward model -> RL, or SFT -> DPO/KTO) as one job.

    align pipeline recipe=rlhf sft.data.path=demos.jsonl rm.data.path=pairs.jsonl ppo.data.path=prompts.jsonl
    align pipeline recipe=dpo peft=lora sft.method.args.max_steps=100
    align pipeline -m recipe=rlhf ppo.method.args.kl_coef=0.02,0.1     # one pipeline folder per value

A recipe (conf/recipe/<name>.yaml) is a list of stages; a stage is an ordinary `align train`
config (its method and overrides, as on that command line) run in `<pipeline folder>/<stage>/`.
The pipeline folder is Hydra's run dir (`hydra.run.dir=...` or `output_dir=...`).

Command-line keys are routed by their first part:

- `<stage>.<key>=v` is the override `<key>=v` of that stage only (`rm.method.mode=listwise`);
- the shared groups and keys `model`, `peft`, `quant`, `seed`, `plot` are given once,
  unprefixed, and apply to every stage;
- `recipe`, `gate.*`, `output_dir`, `debug` and `hydra.*` belong to the pipeline itself.

A stage's overrides are composed in this order (later wins): `method=<its method>`, the
recipe's `shared`, the stage's recipe `overrides`, the shared keys from the command line, the
wiring of its `inputs`, its own command-line keys, `output_dir=<pipeline folder>/<stage>`.
The wiring (see `WIRES`): `policy: sft` sets `model.name_or_path=<folder>/sft` (the starting
policy is also every method's reference, so the reference is the SFT policy);
`reward_model: rm` sets `reward.model.path=<folder>/rm`; `critic: rm` sets
`method.critic_init=reward`, so PPO's value model starts from that same reward model.

Before the first stage starts, every stage is composed and checked as `align train` and
`align data validate` would check it (keys, values, `method.args`, the whole dataset), the
gate's figure is known to exist, and each stage folder's stored config is compared with the new
one. Re-running the same command continues: a finished stage (summary.json) is kept, an
interrupted one (a checkpoint) resumes, a changed one is refused with the difference named.
Before a stage that takes a reward model, that reward model's held-out accuracy (Kendall tau
listwise, Pearson pointwise) must reach `gate.min_accuracy`. At the end, `pipeline_summary.md`
and `pipeline_summary.json` in the pipeline folder hold each stage's key metrics.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import config as schema
from .errors import AlignError, TrainingInterrupted
from .pipeline_plan import (
    POLICY_METHODS,
    Plan,
    Stage,
    decode,
    encode,
    override_kind,
    plan,
    quote_value,
    split_override,
)
from .pipeline_summary import (
    PipelineResult,
    StageResult,
    gate_message,
    gate_result,
    key_metrics,
    render_summary,
    summary_metrics,
    write_summary,
)

log = logging.getLogger("align")


# --- the command line -------------------------------------------------------------------------


# --- planning: compose and check every stage ---------------------------------------------------


# --- running -----------------------------------------------------------------------------------


def continue_command(overrides: list[str], folder: str) -> str:
    """The command that continues this pipeline: its overrides and the pipeline folder."""
    kept = [o for o in overrides if not split_override(o)[1].startswith(("hydra.run.dir", "output_dir"))]
    return " ".join(
        ["align pipeline", *(shlex.quote(o) for o in kept), shlex.quote(f"hydra.run.dir={folder}")]
    )


def _write_stage_config(stage: Stage) -> None:
    """The stage's composed config and overrides, as `align train` leaves them in a run folder."""
    from omegaconf import OmegaConf

    hydra_dir = Path(stage.folder) / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(stage.cfg, resolve=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), encoding="utf-8")
    overrides = [o for o in stage.overrides if not o.startswith("output_dir=")]
    (hydra_dir / "overrides.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.create(overrides)), encoding="utf-8"
    )


def run_pipeline(
    overrides: list[str], folder: str | os.PathLike, callbacks: dict[str, list] | None = None
) -> PipelineResult:
    """Plans (checks every stage), then runs the stages that are not finished, in order.

    Args:
        overrides: the command line's overrides, as typed.
        folder: the pipeline folder.
        callbacks: extra transformers callbacks per stage name (tests, notebooks).

    Raises:
        AlignError: a problem `plan` finds, a failed stage, or a reward model below the gate.
        TrainingInterrupted: a stage was stopped by a signal (after saving a checkpoint); the
            message says how to continue.
    """
    from omegaconf import open_dict

    from .train import train

    started = time.time()
    p = plan(overrides, folder)
    os.makedirs(p.folder, exist_ok=True)
    print(
        f"align pipeline: recipe={p.recipe} -> {p.folder} (the same command with hydra.run.dir={p.folder} continues it)",
        flush=True,
    )
    results: list[StageResult] = []
    gate: dict[str, Any] | None = None
    for stage in p.stages:
        source = stage.inputs.get("reward_model")
        if source is not None and p.gate.get("min_accuracy") is not None:
            gate = gate_result(p.gate, p.stage(source))
            if not gate["passed"] and stage.status != "finished":
                write_summary(p, results, gate, None, "stopped at the gate", time.time() - started)
                raise AlignError(gate_message(gate, stage.name))
        if stage.status == "finished":
            print(f"align pipeline: stage {stage.name} finished earlier, kept: {stage.folder}", flush=True)
            metrics = key_metrics(stage.method, summary_metrics(stage.folder))
            results.append(StageResult(stage.name, stage.method, stage.folder, "kept", metrics))
            continue
        resumed = stage.status == "interrupted"
        how = "resuming from its last checkpoint" if resumed else "training"
        print(
            f"align pipeline: stage {stage.name} (method={stage.method}) {how} -> {stage.folder}", flush=True
        )
        _write_stage_config(stage)
        with open_dict(stage.cfg):
            stage.cfg.resume = resumed
        t0 = time.time()
        try:
            run = train(stage.cfg, callbacks=(callbacks or {}).get(stage.name))
        except TrainingInterrupted as err:
            what = str(err).split("; continue with:", 1)[0]
            write_summary(p, results, gate, None, f"interrupted in stage {stage.name}", time.time() - started)
            raise TrainingInterrupted(
                f"stage {stage.name}: {what}; continue the pipeline with: {continue_command(p.overrides, p.folder)}",
                err.signum,
            ) from None
        except AlignError as err:
            raise AlignError(f"stage {stage.name}: {err} (its keys take the prefix {stage.name}.)") from None
        metrics = key_metrics(stage.method, summary_metrics(stage.folder))
        status = "resumed" if resumed else "trained"
        results.append(
            StageResult(stage.name, stage.method, stage.folder, status, metrics, time.time() - t0, run)
        )
    evaluation = evaluate_policies(p, results)
    write_summary(p, results, gate, evaluation, "finished", time.time() - started)
    print(render_summary(p, results, gate, evaluation, "finished"), flush=True)
    return PipelineResult(p.folder, results, gate, evaluation)


def evaluate_policies(p: Plan, results: list[StageResult]) -> dict[str, Any] | None:
    """The start model, the SFT policy and the final policy side by side (`align eval`'s code).

    Prompts: the last stage's held-out file (`data.eval_path`) when it has one, else its data;
    reward: the pipeline's reward model (rm stage) when there is one, else none (then KL,
    length and diversity only); reference for win rate and KL: the SFT policy. The samples go to
    `<pipeline>/eval/`. Returns what goes into pipeline_summary.json (`evaluation`).
    """
    from omegaconf import OmegaConf

    from . import config as schema
    from .eval_policy import EvalSettings
    from .eval_policy import evaluate_policies as evaluate
    from .eval_tables import write_outputs

    if not p.evaluation.get("enabled", True):
        log.info("pipeline: eval.enabled=false: the policies are not evaluated side by side")
        return None
    policies = {"start": str(p.stages[0].cfg.model.name_or_path)}
    policies.update({r.name: r.folder for r in results if r.method in POLICY_METHODS})
    if len(policies) < 2:
        return None
    reward_model = next((s.folder for s in p.stages if s.method == "rm"), None)
    last = p.stages[-1].cfg
    data = OmegaConf.to_container(last.data, resolve=True)
    held_out = data.get("eval_path")
    data.update(path=held_out or data.get("path"), eval_path=None, eval_split=None, eval_ratio=0.0)
    data["max_samples"] = p.evaluation.get("max_prompts", data.get("max_samples"))
    data = {k: v for k, v in data.items() if k in {f for f in schema.DataConfig.__dataclass_fields__}}
    args = OmegaConf.to_container(last.method.get("args") or {}, resolve=True)
    new_tokens = args.get("max_new_tokens") or args.get("max_completion_length") or 32
    reference = policies.get("sft") or policies["start"]
    # The RL stage's own reward (the wired RM, or its rules); else the pipeline's RM; else none.
    reward = OmegaConf.to_container(last.reward, resolve=True) if last.get("reward") else None
    if not reward and reward_model:
        reward = {"model": {"type": "model", "path": reward_model}}
    folder = os.path.join(p.folder, "eval")
    result = evaluate(
        list(dict.fromkeys(policies.values())),
        schema.DataConfig(**data),
        reward,
        reference=reference,
        settings=EvalSettings(max_new_tokens=int(new_tokens)),
        model_cfg=schema.ModelConfig(**OmegaConf.to_container(last.model, resolve=True)),
        output_dir=folder,
        seed=int(last.get("seed", 42)),
        sample=schema.method_settings(last.method)["sample"],
    )
    write_outputs(result, folder)
    labels = {v: k for k, v in reversed(list(policies.items()))}
    result["labels"] = [labels.get(m["model"], m["model"]) for m in result["models"]]
    result["held_out"] = bool(held_out)
    return result


# --- the entry point ---------------------------------------------------------------------------


@contextmanager
def _keep_global_hydra():
    """Composing a stage (compose.compose_checked) resets Hydra's global state, which the
    running job's sweep still needs: put it back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    saved = GlobalHydra.instance().hydra
    try:
        yield
    finally:
        GlobalHydra.instance().hydra = saved


def prepare(argv: list[str]) -> list[str]:
    """Checks the whole command line (every stage, every sweep value) and picks the pipeline
    folder before Hydra starts; returns the argv to hand to Hydra.

    Raises:
        AlignError: anything `plan` finds, or output_dir with -m.
    """
    from .compat import hydra_args_parser
    from .compose import check_repeated_keys, compose_checked, probe_sets
    from .run_folder import unique_dir

    args = hydra_args_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    rest = list(argv)
    for override in overrides:
        rest.remove(override)
    encoded = encode(overrides)
    if args.help or args.hydra_help or args.shell_completion or args.info or args.cfg:
        return [*rest, *encoded]
    check_repeated_keys(overrides)
    keys = {split_override(o)[1] for o in overrides}
    extra: list[str] = []
    if args.multirun:
        if "output_dir" in keys:
            raise AlignError("output_dir with -m: every job would share one pipeline folder; leave it out")
        for probe in probe_sets(encoded, True):
            plan(decode(probe), None)
        if "hydra.sweep.dir" not in keys:
            cfg = compose_checked(
                [o for o in encoded if override_kind(split_override(o)[1]) != "stage"], True, "pipeline"
            )
            extra.append(f"hydra.sweep.dir={quote_value(unique_dir(str(cfg.hydra.sweep.dir)))}")
        return [*rest, *encoded, *extra]
    cfg = compose_checked(
        [o for o in encoded if override_kind(split_override(o)[1]) != "stage"], True, "pipeline"
    )
    if cfg.get("output_dir"):
        folder = str(cfg.output_dir)
        extra.append(f"hydra.run.dir={quote_value(folder)}")
    elif "hydra.run.dir" in keys:
        folder = str(cfg.hydra.run.dir)
    else:
        folder = str(cfg.hydra.run.dir)
        plan(overrides, None)  # a new folder: nothing in it to compare; a failed check leaves none behind
        folder = unique_dir(folder)
        extra.append(f"hydra.run.dir={quote_value(folder)}")
        return [*rest, *encoded, *extra]
    plan(overrides, folder)
    return [*rest, *encoded, *extra]


_FAILED_JOBS: list[str] = []


def _remove_if_untouched(folder: str) -> None:
    """Deletes a pipeline folder that holds only what Hydra put there (no stage began)."""
    import shutil

    if os.path.isdir(folder) and set(os.listdir(folder)) <= {".hydra", "pipeline.log"}:
        shutil.rmtree(folder, ignore_errors=True)


def _hydra_entry() -> None:
    import hydra

    from .errors import fail

    @hydra.main(config_path=str(schema.CONF_DIR), config_name="pipeline", version_base="1.3")
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        folder = str(cfg.output_dir) if cfg.get("output_dir") else hc.runtime.output_dir
        debug = bool(cfg.get("debug", False))
        try:
            with _keep_global_hydra():
                run_pipeline(decode(list(hc.overrides.task)), folder)
        except TrainingInterrupted as err:
            if debug:
                raise
            fail(err)
        except AlignError as err:
            if debug:
                raise
            if hc.mode == RunMode.MULTIRUN:  # one failed pipeline does not stop the sweep
                print(
                    f"align: error: job {hc.job.num}: {' '.join(str(err).split())}",
                    file=sys.stderr,
                    flush=True,
                )
                _FAILED_JOBS.append(folder)
                return
            _remove_if_untouched(folder)
            fail(err)
        except KeyboardInterrupt:
            if debug:
                raise
            _remove_if_untouched(folder)
            fail(f"interrupted (continue with hydra.run.dir={folder})", 128 + signal.SIGINT)

    _FAILED_JOBS.clear()
    _main()
    if _FAILED_JOBS:
        fail(f"{len(_FAILED_JOBS)} pipeline(s) of the sweep failed: {', '.join(_FAILED_JOBS)}")


def main(argv: list[str]) -> None:
    """Entry for `align pipeline ...`: checks the command line, then Hydra reads it from sys.argv."""
    from .errors import fail, wants_debug

    argv = list(argv)
    try:
        hydra_argv = prepare(argv)
    except AlignError as err:
        if wants_debug(argv):
            raise
        fail(err)
    sys.argv = ["align pipeline", *hydra_argv]
    _hydra_entry()
