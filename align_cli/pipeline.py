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

import copy
import json
import logging
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as schema
from .errors import AlignError, TrainingInterrupted

log = logging.getLogger("align")

# Keys of the pipeline itself (conf/pipeline.yaml), never passed to a stage.
PIPELINE_KEYS = ("recipe", "gate", "eval", "output_dir", "debug", "hydra")
# Given once, unprefixed, applied to every stage.
SHARED_GROUPS = ("model", "peft", "quant")
SHARED_KEYS = ("seed", "plot")
# A stage may not set these: the pipeline decides them (its folder, resuming) or the recipe does.
STAGE_FIXED = ("output_dir", "resume", "hydra", "debug", "method")
# Settings that do not change what a stage trains: left out when stored configs are compared.
NOT_COMPARED = ("output_dir", "resume", "debug", "plot")
# What `inputs` can wire, and the overrides each adds to the consuming stage.
WIRES = {
    "policy": lambda folder: [f"model.name_or_path={_quote(folder)}"],
    "reward_model": lambda folder: [f"++reward.model.path={_quote(folder)}"],
    "critic": lambda folder: ["method.critic_init=reward"],
}
# The methods whose run folder is a policy (a causal LM), for the evaluation hook.
POLICY_METHODS = ("sft", "ppo", "grpo", "dpo", "kto")
# rm's method.mode -> the held-out figure the gate reads from its summary.json (methods/rm.py).
GATE_METRICS = {"pairwise": "eval_accuracy", "listwise": "eval_kendall_tau", "pointwise": "eval_pearson"}
SUMMARY_JSON, SUMMARY_MD = "pipeline_summary.json", "pipeline_summary.md"


@dataclass
class Stage:
    """One stage of a planned pipeline."""

    name: str
    method: str
    inputs: dict[str, str]
    folder: str
    overrides: list[str]  # everything composed for it, in order
    user: list[str]  # its own command-line overrides (prefix removed)
    cfg: Any = None  # the composed config it runs with
    status: str = "new"  # new | interrupted (resumes from a checkpoint) | finished (kept)


@dataclass
class Plan:
    """A pipeline whose every stage has been composed and checked."""

    recipe: str
    folder: str
    stages: list[Stage]
    gate: dict[str, Any]
    overrides: list[str]  # the command line's overrides, as typed
    evaluation: dict[str, Any] = field(default_factory=dict)  # the `eval:` settings

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


@dataclass
class StageResult:
    name: str
    method: str
    folder: str
    status: str  # trained | resumed | kept
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    run: Any = None  # train()'s RunResult when the stage ran in this call


@dataclass
class PipelineResult:
    folder: str
    stages: list[StageResult]
    gate: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


# --- the command line -------------------------------------------------------------------------


def _quote(value: str) -> str:
    from .preflight import _quote as quote

    return quote(str(value))


def _split(override: str) -> tuple[str, str, str]:
    """`+a.b=v` -> ("+", "a.b", "v"); the value is kept as typed."""
    body = override.lstrip("+~")
    prefix = override[: len(override) - len(body)]
    key, _, value = body.partition("=")
    return prefix, key.split("@", 1)[0], value


def _kind(key: str) -> str:
    """pipeline | shared | stage, from a key's first part."""
    head = key.split(".", 1)[0]
    if head in PIPELINE_KEYS:
        return "pipeline"
    if head in SHARED_GROUPS or key in SHARED_KEYS:
        return "shared"
    return "stage"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (schema.CONF_DIR / "recipe").glob("*.yaml"))


# Hydra only accepts keys its config has: a stage's keys reach it as `++<stage>.<key>=v` (which
# adds them to the pipeline config, where nothing reads them), and each job reads its own task
# overrides back. The prefix the user typed is remembered here, per key, to restore it.
_TYPED_PREFIX: dict[str, str] = {}


def encode(overrides: list[str]) -> list[str]:
    """The command line's overrides as Hydra can compose them into conf/pipeline.yaml."""
    out = []
    for override in overrides:
        prefix, key, value = _split(override)
        if _kind(key) == "stage" and prefix.startswith("~"):
            raise AlignError(
                f"{override}: a stage key cannot be deleted in a pipeline; set it to null ({key}=null)"
            )
        if _kind(key) != "stage" or "=" not in override:
            out.append(override)
            continue
        _TYPED_PREFIX[key] = prefix
        out.append(f"++{key}={value}")
    return out


def decode(overrides: list[str]) -> list[str]:
    """A job's task overrides (`encode`d) back as the user typed them."""
    out = []
    for override in overrides:
        prefix, key, value = _split(override)
        if _kind(key) == "stage" and prefix == "++":
            override = f"{_TYPED_PREFIX.get(key, '')}{key}={value}"
        out.append(override)
    return out


# --- planning: compose and check every stage ---------------------------------------------------


def _pipeline_config(overrides: list[str]):
    """conf/pipeline.yaml composed with the pipeline's and the shared overrides."""
    from omegaconf import OmegaConf

    from .preflight import compose_checked

    recipes = recipe_names()
    for override in overrides:
        _, key, value = _split(override)
        if key == "recipe":
            for name in value.split(","):
                if name.strip() not in recipes:
                    raise AlignError(f"unknown recipe '{name.strip()}': choose one of {', '.join(recipes)}")
    wanted = [o for o in overrides if _kind(_split(o)[1]) != "stage" and not _split(o)[1].startswith("hydra")]
    cfg = compose_checked(wanted, config_name="pipeline")
    return cfg, OmegaConf.to_container(cfg.recipe, resolve=True)


def _check_recipe(recipe: dict) -> list[dict]:
    """The recipe's stages, checked: unique names that are not pipeline keys, known methods,
    and inputs that name earlier stages of the right kind."""
    from .methods import REGISTRY

    name = recipe.get("name", "?")
    stages = recipe.get("stages") or []
    if not isinstance(stages, list) or not stages:
        raise AlignError(f"recipe {name}: `stages` must be a non-empty list of {{name, method, overrides}}")
    seen: dict[str, dict] = {}
    for stage in stages:
        sname, method = str(stage.get("name", "")), stage.get("method")
        where = f"recipe {name}, stage '{sname}'"
        if not sname or sname in seen or _kind(sname) != "stage" or "." in sname:
            raise AlignError(f"{where}: stage names must be unique and not one of the pipeline's keys")
        if method not in REGISTRY:
            raise AlignError(f"{where}: method '{method}' is not one of {', '.join(REGISTRY)}")
        for wire, source in (stage.get("inputs") or {}).items():
            if wire not in WIRES:
                raise AlignError(f"{where}: inputs.{wire} is not one of {', '.join(WIRES)}")
            if source not in seen:
                raise AlignError(
                    f"{where}: inputs.{wire}={source} is not an earlier stage ({', '.join(seen)})"
                )
            if wire in ("reward_model", "critic") and seen[source]["method"] != "rm":
                raise AlignError(f"{where}: inputs.{wire}={source} must be an rm stage")
        if "critic" in (stage.get("inputs") or {}) and method != "ppo":
            raise AlignError(f"{where}: only a ppo stage has a critic")
        seen[sname] = stage
    return stages


def _route(overrides: list[str], stage_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(shared overrides, {stage: its overrides without the prefix}) from the command line.

    Raises:
        AlignError: a key that is neither the pipeline's, shared, nor `<stage>.<key>`.
    """
    shared: list[str] = []
    per_stage: dict[str, list[str]] = {s: [] for s in stage_names}
    stages = ", ".join(stage_names)
    for override in overrides:
        prefix, key, value = _split(override)
        kind = _kind(key)
        if kind == "shared":
            shared.append(override)
        if kind != "stage":
            continue
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            if rest == "method":
                raise AlignError(f"{override}: the recipe fixes each stage's method; choose another recipe")
            if rest.split(".", 1)[0] in STAGE_FIXED and not rest.startswith("method."):
                raise AlignError(
                    f"{override}: the pipeline sets each stage's {rest.split('.', 1)[0]} (the stage folder is "
                    f"<pipeline folder>/{head}; re-running the command resumes it)"
                )
            per_stage[head].append(f"{prefix}{rest}={value}")
        elif key == "resume":
            raise AlignError(
                f"{override}: a pipeline resumes by itself: run the same command again with "
                "hydra.run.dir=<pipeline folder> (finished stages are kept, an interrupted one resumes)"
            )
        elif head in ("method", "data", "reward"):
            raise AlignError(
                f"{override}: {head} belongs to one stage: prefix the key with the stage's name "
                f"(stages: {stages}), e.g. {stage_names[-1]}.{key}={value}"
            )
        else:
            raise AlignError(
                f"'{key}' is not an align pipeline option: '{head}' is not a stage of this recipe (stages: "
                f"{stages}; e.g. {stage_names[0]}.method.args.max_steps=10); shared: model=, peft=, quant=, "
                "seed=, plot=; the pipeline's: recipe=, gate.min_accuracy=, gate.metric=, eval.enabled=, eval.max_prompts=, output_dir=, hydra.run.dir="
            )
    return shared, per_stage


def _stored(folder: str) -> dict | None:
    from omegaconf import OmegaConf

    path = os.path.join(folder, ".hydra", "config.yaml")
    return OmegaConf.to_container(OmegaConf.load(path)) if os.path.exists(path) else None


def _compared(container: dict) -> dict:
    return {k: v for k, v in container.items() if k not in NOT_COMPARED}


def _folder_status(stage: Stage, resolved: dict) -> str:
    """new | interrupted | finished, after checking a kept or resumed stage's config is unchanged.

    Raises:
        AlignError: the stage folder holds a run made with other settings (the differences named).
    """
    from .guard import last_checkpoint
    from .preflight import _differences

    finished = os.path.exists(os.path.join(stage.folder, "summary.json"))
    checkpoint = last_checkpoint(stage.folder)
    if not finished and checkpoint is None:
        return "new"  # nothing trained to keep: whatever is there is written over
    stored = _stored(stage.folder)
    if stored is None:
        raise AlignError(
            f"stage {stage.name}: {stage.folder} holds a run that this pipeline did not start (no .hydra/config.yaml); "
            "choose another hydra.run.dir"
        )
    changed = _differences(_compared(stored), _compared(resolved))
    if changed:
        shown = "; ".join(f"{stage.name}.{c}" for c in changed[:4]) + (
            f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
        )
        raise AlignError(
            f"stage {stage.name} in {stage.folder} was {'trained' if finished else 'started'} with other settings "
            f"({shown}): re-run the command it was made with, delete {stage.folder} (and the stages after it) "
            "to redo it, or choose a new hydra.run.dir"
        )
    return "finished" if finished else "interrupted"


# Stage configs whose data and keys were checked in this process (the entry checks before Hydra
# starts, then the job plans again): each is checked once.
_CHECKED: set[str] = set()


def _check_stage(stage: Stage, cfg, root: str) -> None:
    """Every check `align train` and `align data validate` run before loading weights.

    `cfg` is the stage's config with an input policy that does not exist yet replaced by the
    model it will be trained from (same tokenizer), so its data is read the way it will be.
    """
    from omegaconf import OmegaConf

    from .train import preflight_quant, typed
    from .validate import validate

    # Keyed without the pipeline folder: the entry checks a stand-in folder (or a fresh one), the job its own.
    key = json.dumps(_compared(OmegaConf.to_container(cfg, resolve=True)), sort_keys=True, default=str)
    key = key.replace(json.dumps(root)[1:-1], "<pipeline folder>")
    if key in _CHECKED:
        return
    try:
        preflight_quant(typed(cfg, "quant", schema.QuantConfig), typed(cfg, "peft", schema.PeftConfig))
        report = validate(cfg)
    except AlignError as err:
        raise AlignError(f"stage {stage.name}: {err} (its keys take the prefix {stage.name}.)") from None
    # A reward model (or critic) an earlier stage will train does not exist yet: the checks that
    # read its folder run when that stage is done (the stage is planned again then).
    pending = [os.path.join(root, s) for s in stage.inputs.values() if not _finished(os.path.join(root, s))]
    settings = [p for p in report.settings if not any(folder in p for folder in pending)]
    if settings or not all(s.problem_count == 0 for s in report.splits):
        problems = [*settings, *[p for s in report.splits for p in s.problems]]
        count = sum(s.problem_count for s in report.splits) + len(settings)
        more = f" (and {count - 1} more: `align data validate` lists them)" if count > 1 else ""
        raise AlignError(f"stage {stage.name}: {problems[0] if problems else 'invalid data'}{more}")
    _CHECKED.add(key)


def _check_gate(plan_gate: dict, stages: list[Stage]) -> None:
    """The gate's threshold is a number, and each reward model it guards holds out an eval split."""
    from .data import has_eval_source
    from .train import typed

    threshold = plan_gate.get("min_accuracy")
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise AlignError(
            f"gate.min_accuracy={threshold!r} must be a number in [-1, 1] (accuracy, Kendall tau or Pearson), "
            "or null for no gate"
        )
    by_name = {s.name: s for s in stages}
    for stage in stages:
        source = stage.inputs.get("reward_model")
        if source is None:
            continue
        rm = by_name[source]
        data = typed(rm.cfg, "data", schema.DataConfig)
        if not has_eval_source(data) and data.eval_ratio <= 0:
            raise AlignError(
                f"gate: stage {rm.name} holds out nothing for evaluation ({rm.name}.data.eval_ratio=0), so its held-out "
                f"figure cannot be checked before {stage.name}: set {rm.name}.data.eval_ratio=0.1 or "
                f"{rm.name}.data.eval_path=<file>, or turn the gate off with gate.min_accuracy=null"
            )


def plan(overrides: list[str], folder: str | os.PathLike | None) -> Plan:
    """Composes and checks every stage of the pipeline the overrides describe.

    Args:
        overrides: the command line's overrides, as typed (`sft.method.args.max_steps=3`, `peft=lora`).
        folder: the pipeline folder; None checks the configs only (a sweep's jobs, before Hydra
            has made their folders).

    Raises:
        AlignError: an unknown recipe or key, any stage's config or data problem (named with
            the stage), a gate that cannot be checked, or a stage folder holding a run made with
            other settings.
    """
    from omegaconf import OmegaConf

    from .preflight import compose_checked

    pcfg, recipe = _pipeline_config(overrides)
    specs = _check_recipe(recipe)
    shared, per_stage = _route(overrides, [str(s["name"]) for s in specs])
    root = os.path.abspath(os.fspath(folder)) if folder is not None else os.path.abspath("<pipeline folder>")
    stages: list[Stage] = []
    checked_models: dict[str, str] = {}  # stage -> the model its data is checked with
    for spec in specs:
        name, method = str(spec["name"]), str(spec["method"])
        inputs = {k: str(v) for k, v in (spec.get("inputs") or {}).items()}
        wired = [o for wire, source in inputs.items() for o in WIRES[wire](os.path.join(root, source))]
        stage_folder = os.path.join(root, name)
        overrides_ = [
            f"method={method}",
            *[str(o) for o in recipe.get("shared") or []],
            *[str(o) for o in spec.get("overrides") or []],
            *shared,
            *wired,
            *per_stage[name],
            f"output_dir={_quote(stage_folder)}",
        ]
        stage = Stage(
            name, method, inputs, stage_folder, schema.normalize_overrides(overrides_), per_stage[name]
        )
        for override in per_stage[name]:
            key = _split(override)[1]
            if any(key == w.split("=", 1)[0].lstrip("+") for w in wired):
                log.info("stage %s: %s given on the command line replaces the wired input", name, key)
        try:
            stage.cfg = compose_checked(stage.overrides)
        except AlignError as err:
            raise AlignError(f"stage {name}: {err} (its keys take the prefix {name}.)") from None
        resolved = OmegaConf.to_container(stage.cfg, resolve=True)
        if folder is not None:
            stage.status = _folder_status(stage, resolved)
        # A policy an earlier stage will train does not exist yet: check this stage's data with
        # the model that stage starts from (the trained one keeps its tokenizer).
        check_cfg = stage.cfg
        source = inputs.get("policy")
        policy_path = os.path.join(root, source) if source else None
        if source and stage.cfg.model.name_or_path == policy_path and not _finished(policy_path):
            check_cfg = copy.deepcopy(stage.cfg)
            check_cfg.model.name_or_path = checked_models[source]
        checked_models[name] = str(check_cfg.model.name_or_path)
        _check_stage(stage, check_cfg, root)
        stages.append(stage)
    for stage in stages:  # a kept stage must not depend on one that trains again now
        for source in stage.inputs.values():
            upstream = next(s for s in stages if s.name == source)
            if stage.status != "new" and upstream.status != "finished":
                raise AlignError(
                    f"stage {stage.name} in {stage.folder} was made from {source}, which is to be trained again: delete "
                    f"{stage.folder} too (or choose a new hydra.run.dir)"
                )
    gate = OmegaConf.to_container(pcfg.gate, resolve=True)
    _check_gate(gate, stages)
    evaluation = OmegaConf.to_container(pcfg.get("eval") or {}, resolve=True)
    limit = evaluation.get("max_prompts")
    if not isinstance(evaluation.get("enabled", True), bool) or (
        limit is not None and (not isinstance(limit, int) or limit < 1)
    ):
        raise AlignError(
            f"eval.enabled={evaluation.get('enabled')!r}, eval.max_prompts={limit!r}: enabled is true or false, "
            "max_prompts a positive number of prompts or null for all"
        )
    return Plan(str(recipe.get("name")), root, stages, gate, list(overrides), evaluation)


def _finished(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "summary.json"))


# --- running -----------------------------------------------------------------------------------


def _summary_metrics(folder: str) -> dict[str, float | None]:
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
        return json.load(f).get("metrics", {})


def key_metrics(method: str, metrics: dict) -> dict[str, float | None]:
    """The metrics a stage's method names as its key ones (plus its losses and steps)."""
    from .methods import load_method

    keys = getattr(load_method(method), "SUMMARY_KEYS", [])
    wanted = ["loss_first_step", "loss_last_step", *keys, "eval_loss", "global_step"]
    return {k: metrics[k] for k in dict.fromkeys(wanted) if k in metrics}


def gate_result(gate: dict, rm: Stage) -> dict[str, Any]:
    """The gate's figure for a finished reward-model stage: metric, value, threshold, passed."""
    metric = gate.get("metric") or "auto"
    if metric == "auto":
        metric = GATE_METRICS.get(str(rm.cfg.method.get("mode", "pairwise")), "eval_accuracy")
    value = _summary_metrics(rm.folder).get(metric)
    threshold = gate.get("min_accuracy")
    passed = threshold is None or (value is not None and value >= threshold)
    return {"stage": rm.name, "metric": metric, "value": value, "min_accuracy": threshold, "passed": passed}


def _gate_message(result: dict, consumer: str) -> str:
    value = result["value"]
    rm = result["stage"]
    shown = "missing" if value is None else f"{value:.4g}"
    why = (
        f"{rm}/summary.json has no {result['metric']} (no held-out evaluation, or undefined)"
        if value is None
        else f"the reward model's held-out {result['metric']} is {shown}"
    )
    return (
        f"gate: {why}, below gate.min_accuracy={result['min_accuracy']}: stopped before {consumer}, which would "
        f"optimise a reward that does not rank answers reliably. Improve the reward model ({rm}.data.path, "
        f"{rm}.method.args.num_train_epochs, {rm}.method.args.learning_rate) and delete its folder to retrain it, "
        "or lower gate.min_accuracy"
    )


def continue_command(overrides: list[str], folder: str) -> str:
    """The command that continues this pipeline: its overrides and the pipeline folder."""
    kept = [o for o in overrides if not _split(o)[1].startswith(("hydra.run.dir", "output_dir"))]
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
                _write_summary(p, results, gate, None, "stopped at the gate", time.time() - started)
                raise AlignError(_gate_message(gate, stage.name))
        if stage.status == "finished":
            print(f"align pipeline: stage {stage.name} finished earlier, kept: {stage.folder}", flush=True)
            metrics = key_metrics(stage.method, _summary_metrics(stage.folder))
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
            _write_summary(
                p, results, gate, None, f"interrupted in stage {stage.name}", time.time() - started
            )
            raise TrainingInterrupted(
                f"stage {stage.name}: {what}; continue the pipeline with: {continue_command(p.overrides, p.folder)}",
                err.signum,
            ) from None
        except AlignError as err:
            raise AlignError(f"stage {stage.name}: {err} (its keys take the prefix {stage.name}.)") from None
        metrics = key_metrics(stage.method, _summary_metrics(stage.folder))
        status = "resumed" if resumed else "trained"
        results.append(
            StageResult(stage.name, stage.method, stage.folder, status, metrics, time.time() - t0, run)
        )
    evaluation = evaluate_policies(p, results)
    _write_summary(p, results, gate, evaluation, "finished", time.time() - started)
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
    from .evaluate import EvalSettings, write_outputs
    from .evaluate import evaluate_policies as evaluate

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
        sample=last.method.get("sample"),
    )
    write_outputs(result, folder)
    labels = {v: k for k, v in reversed(list(policies.items()))}
    result["labels"] = [labels.get(m["model"], m["model"]) for m in result["models"]]
    result["held_out"] = bool(held_out)
    return result


def _summary(p: Plan, results: list[StageResult], gate, evaluation, state: str, seconds: float) -> dict:
    return {
        "recipe": p.recipe,
        "folder": p.folder,
        "state": state,
        "seconds": round(seconds, 1),
        "stages": [
            {
                "name": r.name,
                "method": r.method,
                "folder": r.folder,
                "status": r.status,
                "seconds": round(r.seconds, 1),
                "metrics": r.metrics,
            }
            for r in results
        ],
        "gate": gate,
        "evaluation": evaluation,
    }


def render_summary(p: Plan, results: list[StageResult], gate, evaluation, state: str) -> str:
    """The markdown summary: one row per stage with its key metrics, the gate, the evaluation."""

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"# align pipeline: recipe={p.recipe} ({state})", "", f"Folder: `{p.folder}`", ""]
    lines += ["| stage | method | status | key metrics |", "|---|---|---|---|"]
    for r in results:
        shown = ", ".join(f"{k} {cell(v)}" for k, v in r.metrics.items())
        lines.append(f"| {r.name} | {r.method} | {r.status} | {shown} |")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines += [
            "",
            f"Gate: {gate['stage']} {gate['metric']} = {cell(gate['value'])} "
            f"(gate.min_accuracy {gate['min_accuracy']}): {verdict}",
        ]
    lines += [
        "",
        *_evaluation_table(evaluation),
    ]
    return "\n".join(lines) + "\n"


def _evaluation_table(evaluation: dict | None) -> list[str]:
    """The policies side by side: the few numbers that say whether the run aligned."""
    if not evaluation:
        return ["Evaluation: not run"]
    keys = ["reward_greedy", "reward_sampled", "win_rate_greedy", "kl_to_reference", "length_greedy",
            "distinct_2_sampled", "identical_share_greedy"]  # fmt: skip
    where = "held-out prompts" if evaluation.get("held_out") else "the last stage's prompts"
    lines = [f"## Evaluation ({evaluation.get('rows', '?')} {where}; details in eval/eval.md)", ""]
    lines += ["| policy | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, model in zip(evaluation.get("labels", []), evaluation["models"], strict=False):
        cells = []
        for key in keys:
            value = model["metrics"].get(key)
            cells.append("n/a" if not isinstance(value, (int, float)) or value != value else f"{value:.4g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _write_summary(p: Plan, results, gate, evaluation, state: str, seconds: float) -> None:
    from .callbacks import finite_or_none

    data = _summary(p, results, gate, evaluation, state, seconds)
    for stage in data["stages"]:
        stage["metrics"] = {k: finite_or_none(v) for k, v in stage["metrics"].items()}
    if data["evaluation"]:
        from .evaluate import strict_json

        data["evaluation"] = strict_json(data["evaluation"])  # an undefined metric (NaN) is null
    Path(p.folder, SUMMARY_JSON).write_text(json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
    Path(p.folder, SUMMARY_MD).write_text(
        render_summary(p, results, gate, evaluation, state), encoding="utf-8"
    )


# --- the entry point ---------------------------------------------------------------------------


@contextmanager
def _keep_global_hydra():
    """Composing a stage (preflight.compose_checked) resets Hydra's global state, which the
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
    from .preflight import _probe_sets, check_repeated_keys, compose_checked, unique_dir

    args = hydra_args_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    rest = list(argv)
    for override in overrides:
        rest.remove(override)
    encoded = encode(overrides)
    if args.help or args.hydra_help or args.shell_completion or args.info or args.cfg:
        return [*rest, *encoded]
    check_repeated_keys(overrides)
    keys = {_split(o)[1] for o in overrides}
    extra: list[str] = []
    if args.multirun:
        if "output_dir" in keys:
            raise AlignError("output_dir with -m: every job would share one pipeline folder; leave it out")
        for probe in _probe_sets(encoded, True):
            plan(decode(probe), None)
        if "hydra.sweep.dir" not in keys:
            cfg = compose_checked([o for o in encoded if _kind(_split(o)[1]) != "stage"], True, "pipeline")
            extra.append(f"hydra.sweep.dir={_quote(unique_dir(str(cfg.hydra.sweep.dir)))}")
        return [*rest, *encoded, *extra]
    cfg = compose_checked([o for o in encoded if _kind(_split(o)[1]) != "stage"], True, "pipeline")
    if cfg.get("output_dir"):
        folder = str(cfg.output_dir)
        extra.append(f"hydra.run.dir={_quote(folder)}")
    elif "hydra.run.dir" in keys:
        folder = str(cfg.hydra.run.dir)
    else:
        folder = str(cfg.hydra.run.dir)
        plan(overrides, None)  # a new folder: nothing in it to compare; a failed check leaves none behind
        folder = unique_dir(folder)
        extra.append(f"hydra.run.dir={_quote(folder)}")
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

    from .train import fail

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
    from .train import _wants_debug, fail

    argv = list(argv)
    try:
        hydra_argv = prepare(argv)
    except AlignError as err:
        if _wants_debug(argv):
            raise
        fail(err)
    sys.argv = ["align pipeline", *hydra_argv]
    _hydra_entry()
