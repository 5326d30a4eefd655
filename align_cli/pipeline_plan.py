"""`align pipeline`'s plan: a recipe's stages, each composed and checked before the first runs.

How command-line keys are routed to stages and how stages are wired together is described in
pipeline.py; `plan()` does it, and says for each stage folder whether it is new, interrupted
(resumes) or finished (kept), refusing one whose stored config differs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from . import config as schema
from .errors import AlignError
from .methods.ptx_data import ptx_override

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
# Each takes the earlier stage it is wired to (a `Stage`).
WIRES = {
    "policy": lambda source: [f"model.name_or_path={quote_value(source.folder)}"],
    "reward_model": lambda source: [f"++reward.model.path={quote_value(source.folder)}"],
    "critic": lambda source: ["method.critic_init=reward"],
    "ptx": lambda source: ptx_override(source.cfg, source.name),  # data.ptx_path=<its data>
}


# The methods whose run folder is a policy (a causal LM), for the evaluation hook.
POLICY_METHODS = ("sft", "ppo", "grpo", "dpo", "kto")


# rm's method.mode -> the held-out figure the gate reads from its summary.json (methods/rm.py).
GATE_METRICS = {"pairwise": "eval_accuracy", "listwise": "eval_kendall_tau", "pointwise": "eval_pearson"}


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


def quote_value(value: str) -> str:
    from .compose import quote_value as quote

    return quote(str(value))


def split_override(override: str) -> tuple[str, str, str]:
    """`+a.b=v` -> ("+", "a.b", "v"); the value is kept as typed."""
    body = override.lstrip("+~")
    prefix = override[: len(override) - len(body)]
    key, _, value = body.partition("=")
    return prefix, key.split("@", 1)[0], value


def override_kind(key: str) -> str:
    """pipeline | shared | stage, from a key's first part."""
    head = key.split(".", 1)[0]
    if head in PIPELINE_KEYS:
        return "pipeline"
    if head in SHARED_GROUPS or key in SHARED_KEYS:
        return "shared"
    return "stage"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (schema.CONF_DIR / "recipe").glob("*.yaml"))


def encode(overrides: list[str]) -> list[str]:
    """The command line's overrides as Hydra can compose them into conf/pipeline.yaml."""
    out = []
    for override in overrides:
        prefix, key, value = split_override(override)
        if override_kind(key) == "stage" and prefix.startswith("~"):
            raise AlignError(
                f"{override}: a stage key cannot be deleted in a pipeline; set it to null ({key}=null)"
            )
        if override_kind(key) != "stage" or "=" not in override:
            out.append(override)
            continue
        _TYPED_PREFIX[key] = prefix
        out.append(f"++{key}={value}")
    return out


def decode(overrides: list[str]) -> list[str]:
    """A job's task overrides (`encode`d) back as the user typed them."""
    out = []
    for override in overrides:
        prefix, key, value = split_override(override)
        if override_kind(key) == "stage" and prefix == "++":
            override = f"{_TYPED_PREFIX.get(key, '')}{key}={value}"
        out.append(override)
    return out


def _pipeline_config(overrides: list[str]):
    """conf/pipeline.yaml composed with the pipeline's and the shared overrides."""
    from omegaconf import OmegaConf

    from .compose import compose_checked

    recipes = recipe_names()
    for override in overrides:
        _, key, value = split_override(override)
        if key == "recipe":
            for name in value.split(","):
                if name.strip() not in recipes:
                    raise AlignError(f"unknown recipe '{name.strip()}': choose one of {', '.join(recipes)}")
    wanted = [
        o
        for o in overrides
        if override_kind(split_override(o)[1]) != "stage" and not split_override(o)[1].startswith("hydra")
    ]
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
        if not sname or sname in seen or override_kind(sname) != "stage" or "." in sname:
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
            if wire == "ptx" and seen[source]["method"] != "sft":
                raise AlignError(f"{where}: inputs.ptx={source} must be an sft stage (its demonstrations)")
        if "critic" in (stage.get("inputs") or {}) and method != "ppo":
            raise AlignError(f"{where}: only a ppo stage has a critic")
        if "ptx" in (stage.get("inputs") or {}) and method not in ("ppo", "grpo"):
            raise AlignError(f"{where}: only a ppo or grpo stage has a ptx loss")
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
        prefix, key, value = split_override(override)
        kind = override_kind(key)
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
    from .preflight import config_differences

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
    changed = config_differences(_compared(stored), _compared(resolved))
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


def _check_stage(stage: Stage, cfg, root: str) -> None:
    """Every check `align train` and `align data validate` run before loading weights.

    `cfg` is the stage's config with an input policy that does not exist yet replaced by the
    model it will be trained from (same tokenizer), so its data is read the way it will be.
    """
    from omegaconf import OmegaConf

    from .run_checks import preflight_quant, typed
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
    from .data.holdout import has_eval_source
    from .run_checks import typed

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

    from .compose import compose_checked

    pcfg, recipe = _pipeline_config(overrides)
    specs = _check_recipe(recipe)
    shared, per_stage = _route(overrides, [str(s["name"]) for s in specs])
    root = os.path.abspath(os.fspath(folder)) if folder is not None else os.path.abspath("<pipeline folder>")
    stages: list[Stage] = []
    checked_models: dict[str, str] = {}  # stage -> the model its data is checked with
    for spec in specs:
        name, method = str(spec["name"]), str(spec["method"])
        inputs = {k: str(v) for k, v in (spec.get("inputs") or {}).items()}
        by_name = {s.name: s for s in stages}
        wired = [o for wire, source in inputs.items() for o in WIRES[wire](by_name[source])]
        stage_folder = os.path.join(root, name)
        overrides_ = [
            f"method={method}",
            *[str(o) for o in recipe.get("shared") or []],
            *[str(o) for o in spec.get("overrides") or []],
            *shared,
            *wired,
            *per_stage[name],
            f"output_dir={quote_value(stage_folder)}",
        ]
        stage = Stage(
            name, method, inputs, stage_folder, schema.normalize_overrides(overrides_), per_stage[name]
        )
        for override in per_stage[name]:
            key = split_override(override)[1]
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


# Hydra only accepts keys its config has: a stage's keys reach it as `++<stage>.<key>=v` (which
# adds them to the pipeline config, where nothing reads them), and each job reads its own task
# overrides back. The prefix the user typed is remembered here, per key, to restore it.
_TYPED_PREFIX: dict[str, str] = {}


# Stage configs whose data and keys were checked in this process (the entry checks before Hydra
# starts, then the job plans again): each is checked once.
_CHECKED: set[str] = set()
