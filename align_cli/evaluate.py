"""`align eval`: how aligned are these models? Policies on prompts, reward models on labelled data.

    align eval model.name_or_path=outputs/ppo/<run> reward=model reward.model.path=outputs/rm/<run> \\
        data.path=heldout_prompts.jsonl eval.reference=outputs/sft/<run>
    align eval model.name_or_path=<start>,<sft run>,<ppo run> ...       # several models, one table
    align eval method=rm model.name_or_path=outputs/rm/<run> data.path=heldout_pairs.jsonl
    align eval method=rm method.mode=listwise model.name_or_path=<rm run> data.path=rankings.jsonl

Policies (no `method`, or method=ppo|grpo for their sample prompts): each model answers every
prompt of `data.path` (any prompt layout `align train method=ppo` reads), greedily and by
sampling (`eval.*`). For each kind of completion the table has the mean reward under the
`reward` option (a reward model, rules, your functions or a `mix`, exactly as PPO/GRPO score),
the win rate against `eval.reference` (the same reward as judge: 1 a win, 0.5 a tie, per
prompt), the mean length in tokens, distinct-1/2 and the share of completions identical across
different prompts (align_cli/diagnostics.py); on the sampled ones also the KL to the reference,
mean over tokens of log pi - log pi_ref on the policy's own samples (at the sampling
temperature; 0 for a model against itself).

Reward models (`method=rm`, `method.mode` picks the data): pairwise accuracy and margin,
listwise Kendall tau and top-1 accuracy, pointwise MSE (on the scale the model was trained on),
Pearson and Spearman, computed by the functions training's evaluation uses (rm_metrics.py).

The eval folder (`outputs/eval/<time>/`, or `hydra.run.dir=` / `output_dir=`) gets eval.json
(every figure), eval.md (the table, also printed) and samples.jsonl (every completion and its
reward), beside `.hydra/` with the composed config. `evaluate_policies` and
`evaluate_reward_models` are what `align pipeline` calls.

Here: the command (schema, composing, `run`); policies are eval_policy.py, reward models
eval_rm.py, the outputs eval_tables.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .config import DataConfig, ModelConfig
from .errors import AlignError
from .eval_policy import EvalSettings, evaluate_policies
from .eval_rm import evaluate_reward_models
from .eval_tables import write_outputs


@dataclass
class EvalRoot:
    """The root of `align eval`'s composed config (conf/eval.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = None
    reward: Any = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 42
    output_dir: str | None = None  # null: hydra.run.dir
    debug: bool = False


def register() -> None:
    """Registers the eval schema beside the training one; safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    schema.register()
    ConfigStore.instance().store(name="align_eval_schema", node=EvalRoot)


# --- generation and scoring ----------------------------------------------------------------


# --- policies ------------------------------------------------------------------------------


# --- reward models -------------------------------------------------------------------------


# --- output --------------------------------------------------------------------------------


# --- the command ---------------------------------------------------------------------------


def run(cfg: DictConfig, output_dir: str) -> dict:
    """Evaluates what a composed eval config describes; writes the eval folder; returns the result."""
    import dataclasses

    from .run_checks import typed

    model_cfg = typed(cfg, "model", ModelConfig)
    data_cfg = typed(cfg, "data", DataConfig)
    settings = typed(cfg, "eval", EvalSettings)
    method = schema.method_settings(cfg.method) if cfg.get("method") else {}
    reward = OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") else None
    models = [m.strip() for m in str(model_cfg.name_or_path).split(",") if m.strip()]
    name = method.get("name")
    if name == "rm":
        if reward:
            raise AlignError(
                "method=rm evaluates the reward models named by model.name_or_path: drop the reward settings"
            )
        result = evaluate_reward_models(
            models, data_cfg, method["mode"], method.get("sample"), settings.batch_size
        )
    elif name in (None, "ppo", "grpo"):
        result = evaluate_policies(
            models,
            data_cfg,
            reward,
            settings.reference,
            settings,
            dataclasses.replace(model_cfg, name_or_path="tiny"),
            output_dir,
            int(cfg.get("seed", 42)),
            method.get("sample"),
        )
    else:
        raise AlignError(
            f"align eval takes no method={name}: leave method out to evaluate policies on prompts "
            "(method=ppo or grpo for their sample prompts), or use method=rm for reward models"
        )
    table = write_outputs(result, output_dir)
    print(f"align: eval ({result['kind']}) on {result['data']}, {result['rows']} rows -> {output_dir}")
    print(table, end="", flush=True)
    return result


EVAL_USAGE = """usage: align eval model.name_or_path=<model>[,<model>...] [reward=<option> ...] [data.path=<file>] [eval.<key>=<value>]
       align eval method=rm [method.mode=pairwise|pointwise|listwise] model.name_or_path=<rm run> data.path=<file>

Policies: every model answers every prompt of data.path (greedy and sampled); the table has the
mean reward under `reward=` (model, length, keyword, match, format, function, mix), the win rate
and KL against eval.reference, the length, distinct-1/2 and the share of identical completions
across prompts. Reward models (method=rm): accuracy and margin (pairwise), Kendall tau and top-1
(listwise), MSE, Pearson and Spearman (pointwise), as training evaluates them.

Writes eval.json, eval.md and samples.jsonl to outputs/eval/<time>/ (or hydra.run.dir=<folder>).

settings (eval.*): reference, max_new_tokens (32), temperature (1.0), top_p (1.0), num_samples (1),
batch_size (16), greedy (true), sampled (true)

examples:
  align eval model.name_or_path=outputs/ppo/<run>,outputs/sft/<run> reward=model \\
      reward.model.path=outputs/rm/<run> data.path=heldout_prompts.jsonl eval.reference=outputs/sft/<run>
  align eval method=rm model.name_or_path=outputs/rm/<run> data.path=heldout_pairs.jsonl
"""


def _models_override(argv: list[str]) -> list[str]:
    """`model.name_or_path=a,b,c` as one quoted string (Hydra would read a comma list as a sweep)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "model.name_or_path" and "," in value and value[:1] not in "'\"":
            arg = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out


def main(argv: list[str]) -> None:
    """Entry for `align eval [overrides]`."""
    from .compose import check_repeated_keys, compose_checked
    from .errors import fail, wants_debug
    from .run_folder import unique_dir

    if {"-h", "--help"} & set(argv):
        print(EVAL_USAGE)
        return
    argv = _models_override(schema.normalize_overrides(list(argv)))
    try:
        check_repeated_keys(argv)
        register()
        cfg = compose_checked(argv, return_hydra_config=True, config_name="eval")
        output_dir = str(cfg.output_dir) if cfg.get("output_dir") else unique_dir(str(cfg.hydra.run.dir))
        os.makedirs(os.path.join(output_dir, ".hydra"), exist_ok=True)
        saved = OmegaConf.to_container(cfg)
        saved.pop("hydra", None)  # the run folder is chosen; the config saved is the user's part
        OmegaConf.save(OmegaConf.create(saved), os.path.join(output_dir, ".hydra", "config.yaml"))
        OmegaConf.save(OmegaConf.create(list(argv)), os.path.join(output_dir, ".hydra", "overrides.yaml"))
        run(cfg, output_dir)
    except AlignError as err:
        if wants_debug(argv):
            raise
        fail(err)
    except KeyboardInterrupt:
        print("\nalign: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
