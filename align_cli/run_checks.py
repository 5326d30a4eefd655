"""The checks of a composed config that need no model weights, shared by `align train`,
`align data validate`, `align data preview` and the pipeline: the typed groups, the method, its
settings (`config.method_settings`) and `method.args`, quantization, and reading both data splits
as the run will.
"""

from __future__ import annotations

import warnings

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .errors import AlignError, nearest, one_line

schema.register()


def typed(cfg: DictConfig, key: str, cls: type):
    """Converts one config group to its dataclass (DictConfig stops here).

    Raises:
        AlignError: a key the dataclass does not have (added with `+group.key=...`), named with
            the nearest valid keys.
    """
    import dataclasses

    node = cfg.get(key)
    if node is None:
        return cls()
    values = OmegaConf.to_container(node, resolve=True)
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in valid:
            raise AlignError(
                f"{key}.{name} is not a {key} option{nearest(name, valid)}; valid keys: {', '.join(valid)}"
            )
    return cls(**values)


def preflight_quant(quant_cfg: schema.QuantConfig, peft_cfg: schema.PeftConfig) -> None:
    """Checks that `quant=4bit|8bit` can run here, before any data or weights are read.

    Raises:
        AlignError: quantization without LoRA, or bitsandbytes that does not import or cannot
            quantize a tensor on this machine's device.
    """
    if not quant_cfg.bits:
        return
    if peft_cfg.method == "none":
        raise AlignError(
            f"quant={quant_cfg.bits}bit needs peft=lora: quantized weights cannot be trained directly"
        )
    from . import modeling

    modeling.bnb_config(quant_cfg)  # validates the settings and imports bitsandbytes
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # Importing can succeed while the native library cannot run (no kernel for this
        # device, a CUDA mismatch): quantize one small tensor the way loading will.
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(
            torch.ones(64, 64, device=device, dtype=torch.float32), quant_type=quant_cfg.quant_type
        )
    except Exception as err:
        raise AlignError(
            f"quant={quant_cfg.bits}bit: bitsandbytes cannot run on this machine's {device} "
            f"({type(err).__name__}: {one_line(str(err))}); use quant=none, or install a bitsandbytes "
            "build for this device"
        ) from None
    if quant_cfg.bits == 4:
        from .compat import check_4bit_training

        # A kernel that trains until the first evaluation and then crashes, or passes no
        # gradient, would lose a run hours in: try an eval pass then a backward now.
        problem = check_4bit_training(
            device, quant_cfg.quant_type, modeling.torch_dtype(quant_cfg.compute_dtype)
        )
        if problem:
            raise AlignError(
                f"quant=4bit: bitsandbytes {_version('bitsandbytes')} cannot train on this machine's {device}: "
                f"{problem}; use quant=none, or a bitsandbytes version align supports (see pyproject.toml)"
            )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def check_known_keys(cfg: DictConfig, method: dict) -> None:
    """Top-level keys added with `+` that nothing reads are mistakes (`+foo=1`): name them. So is a
    reward set for a method that takes none (one whose settings have no `default_reward`).

    A method's own keys are its settings class's (`config.method_settings` refuses the others).
    """
    import dataclasses

    from .methods import REGISTRY, settings_class

    top = {f.name for f in dataclasses.fields(schema.AlignConfig)}
    for key in cfg:
        if key not in top and key != "hydra":
            raise AlignError(
                f"'{key}' is not an align option{nearest(str(key), top)}; valid keys: {', '.join(sorted(top))}"
            )

    def takes_reward(name: str) -> bool:
        return any(f.name == "default_reward" for f in dataclasses.fields(settings_class(name)))

    if not takes_reward(method["name"]) and cfg.get("reward"):
        rewarded = [n for n in REGISTRY if takes_reward(n)]
        raise AlignError(
            f"method={method['name']} takes no reward (only {' and '.join(rewarded)} do): drop the reward "
            f"settings ({', '.join(str(k) for k in cfg.reward)})"
        )


def check_method_args(module, ctx) -> None:
    """Builds the method's trainer config once up front, so a typo in method.args fails now.

    Raises:
        AlignError: an unknown key (named, with the nearest valid ones) or a rejected value.
    """
    if not hasattr(module, "config_class"):
        return
    # Quietly: the trainer builds this config again and shows its deprecation warnings then.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx.config = ctx.trl_config(module.config_class())


def checked_config(cfg: DictConfig):
    """The method module, a `MethodContext` (no tokenizer or data yet) and the data config of a
    composed config, after every check that needs neither: the method and its keys, its data
    settings, the typed groups and `method.args` (`align train` and `align data validate` alike).

    Raises:
        AlignError: no method, an unknown key, a group key or value that is not valid, or a
            `method.args` key or value the method's config class rejects.
    """
    from .methods import load_method
    from .methods.base import MethodContext

    if not cfg.get("method") or "name" not in cfg.method:
        raise AlignError("no method chosen: add method=<sft|rm|ppo|dpo|kto|grpo>")
    method = schema.method_settings(cfg.method)  # every method.<key> known and valid
    check_known_keys(cfg, method)
    args = method.pop("args", None) or {}
    module = load_method(method["name"])
    data_cfg = typed(cfg, "data", schema.DataConfig)
    ctx = MethodContext(
        method=method,
        args=args,
        model_cfg=typed(cfg, "model", schema.ModelConfig),
        quant_cfg=typed(cfg, "quant", schema.QuantConfig),
        peft_cfg=typed(cfg, "peft", schema.PeftConfig),
        tokenizer=None,
        train_dataset=None,
        reward=OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") is not None else None,
        seed=int(cfg.get("seed", 42)),
        dist=typed(cfg, "dist", schema.DistConfig),
        data_cfg=data_cfg,
    )
    from .methods.ptx_data import PTX_METHODS, ptx_read_keys_set

    ptx_keys = (["data.ptx_path"] if data_cfg.ptx_path is not None else []) + ptx_read_keys_set(data_cfg)
    if ptx_keys and method["name"] not in PTX_METHODS:
        raise AlignError(
            f"{ptx_keys[0]} belongs to the ptx loss's data (ppo and grpo): method={method['name']} reads none "
            f"(drop {', '.join(ptx_keys)})"
        )
    from .dist import config_problem

    problem = config_problem(ctx.dist, method["name"], args, ctx.quant_cfg.bits)
    if problem:
        raise AlignError(problem)
    check_method_args(module, ctx)
    from . import model_checks, modeling

    # From the model's config and file headers only: no weights are read.
    model_checks.check_target_modules(ctx.model_cfg, ctx.peft_cfg)
    model_checks.check_weight_files(modeling.resolve_model_path(ctx.model_cfg))
    return module, ctx, data_cfg


def read_run_data(module, ctx, data_cfg, tokenizer, problems=None):
    """Both splits of a checked config, read and checked as the run will get them: the method's
    standard format, the tokenizer's chat template, the method's prompt room, the rewards' row
    checks. `align train`, `align data validate` and `align data preview` all read through it.

    Args:
        problems: (train, eval) collectors (validate); None: stop at the first problem.

    Returns:
        `data.Splits`.
    """
    from .data import read_splits
    from .methods import prompt_room
    from .rewards import row_check

    return read_splits(
        data_cfg,
        ctx.method["dataset_type"],
        conversational=tokenizer.chat_template is not None,
        seed=ctx.seed,
        sample=ctx.method.get("sample"),
        tokenizer=tokenizer,
        room=prompt_room(module, ctx.args, ctx.model_cfg),
        row_check=row_check(ctx.reward),  # values a reward cannot use, named by file:line
        problems=problems,
    )


def checked_run_data(module, ctx, data_cfg, problems=None):
    """The tokenizer, both splits and the method's own problems: the part of the run plan that
    reads data, shared by `align train` (train.plan_run: it stops on the first problem) and
    `align data validate` (it collects them all, `problems` = (train, eval) collectors).

    Returns:
        (tokenizer, `data.Splits`, the method's problems as one-line strings).
    """
    from . import modeling
    from .methods import method_problems

    tokenizer = modeling.load_tokenizer(ctx.model_cfg)
    ctx.tokenizer = tokenizer  # the checks read extra data (data.ptx_path) as training will
    splits = read_run_data(module, ctx, data_cfg, tokenizer, problems=problems)
    rows = splits.train.rows if splits.train is not None else None
    return tokenizer, splits, method_problems(module, ctx, rows)
