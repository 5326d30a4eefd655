"""Typed schemas for our own config keys, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `align_schema` first in its defaults, so every composed config is
checked against these dataclasses: a typo such as `model.nme_or_path=x` or a string where an
int belongs fails when the config is composed, before anything is loaded.

`method` is typed per method: each `methods/<name>.py` declares a `Settings` subclass of
`MethodSettings` for its own keys and their defaults, registered as `method/schema/<name>`, which
`conf/method/<name>.yaml` lists first in its defaults. `method.args` stays open: it belongs to
TRL's config dataclasses, which check it themselves (see `methods.base.MethodContext.trl_config`).
`reward` stays open too (rewards/ checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AlignError, nearest

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """`conf/` and `data_samples/` ship inside the package; a source checkout has them at the top."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _resource_dir("conf")
SAMPLES_DIR = _resource_dir("data_samples")


@dataclass
class ModelConfig:
    """Which model and tokenizer to start from."""

    name_or_path: str = "tiny"  # "tiny", a hub id or a local directory (e.g. a run folder)
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2
    chat_template: str | None = None  # a Jinja template string or a file path overriding the tokenizer's
    max_length: int = 512  # prompt + response tokens; longer rows are truncated by the trainer

    def __post_init__(self):
        if self.max_length is None or self.max_length < 2:
            raise AlignError(
                f"model.max_length={self.max_length} is not valid: give the most tokens of prompt + answer (e.g. 512)"
            )


@dataclass
class DataConfig:
    """Where the dataset is and how to read it."""

    # A file (json/jsonl/csv/parquet/txt), a folder, a hub dataset id, or a list of them (each may
    # be {path, rows} or {path, share} to take part of it); null: the method's sample. Any: a list
    # is valid too, which `str | None` would refuse when composing (checked in data/sources.py).
    path: Any = None
    format: str = "auto"  # auto: detected from the columns; or one of the formats in data/formats.py
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    eval_path: Any = None  # a separate evaluation file, folder or hub id, or a list (as data.path)
    eval_split: str | None = None  # the evaluation split: a hub split, or `test` for a folder's test.jsonl
    eval_ratio: float = 0.1  # without eval_path/eval_split: held out of `split` by prompt (0: no evaluation)
    columns: dict[str, str] = field(default_factory=dict)  # our column name -> the name in your file
    max_samples: int | None = None
    system: str | None = None  # a system prompt added to every conversational prompt
    dataset: str | None = None  # with data.path=<dataset_info.json>: the LLaMA-Factory dataset to read
    too_long: str = "refuse"  # prompts with no room left for an answer: refuse | drop | truncate
    # ppo: demonstrations (any SFT layout, a file/folder/hub id/list as data.path) for the PPO-ptx
    # loss, weighted by method.args.ptx_coef; `align pipeline recipe=rlhf` wires in the SFT stage's data.
    ptx_path: Any = None
    # How data.ptx_path is read, as data.format/columns/subset/split/dataset read data.path (the
    # pipeline's `ptx: <sft stage>` wire copies that stage's own values).
    ptx_format: str = "auto"
    ptx_columns: dict[str, str] = field(default_factory=dict)
    ptx_subset: str | None = None
    ptx_split: str = "train"
    ptx_dataset: str | None = None

    def __post_init__(self):
        if not 0 <= self.eval_ratio < 1:
            raise AlignError(f"data.eval_ratio={self.eval_ratio} must be in [0, 1) (0: no held-out split)")
        if self.too_long not in ("refuse", "drop", "truncate"):
            raise AlignError(f"data.too_long={self.too_long} is not valid: use refuse, drop or truncate")
        if self.max_samples is not None and self.max_samples < 1:
            raise AlignError(f"data.max_samples={self.max_samples} must be at least 1, or null for every row")


@dataclass
class PeftConfig:
    """LoRA settings (`peft=none` or `peft=lora`)."""

    method: str = "none"  # none | lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        # peft checks none of these until the adapter is built (r=0 is a ZeroDivisionError).
        problems = []
        if self.r < 1:
            problems.append(f"peft.r={self.r} must be at least 1 (the rank of the LoRA update, e.g. 8 or 16)")
        if self.alpha <= 0:
            problems.append(f"peft.alpha={self.alpha} must be positive (LoRA scales its update by alpha / r)")
        if not 0 <= self.dropout < 1:
            problems.append(f"peft.dropout={self.dropout} must be in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            ok = bool(targets.strip())
        else:
            ok = (
                isinstance(targets, (list, tuple))
                and bool(targets)
                and all(isinstance(t, str) and t for t in targets)
            )
        if not ok:
            problems.append(
                f"peft.target_modules={targets!r} must be all-linear or a list of module names "
                "(e.g. [q_proj,v_proj])"
            )
        if problems:
            raise AlignError("; ".join(problems))


@dataclass
class QuantConfig:
    """Weight quantization with bitsandbytes (`quant=none|4bit|8bit`)."""

    bits: int | None = None  # null, 4 or 8
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 where supported, else float32


@dataclass
class SweepConfig:
    """What a multirun optimises and sorts its results table by (see sweep.py)."""

    metric: str | None = None  # a key of summary.json, e.g. eval_rewards/accuracies; null: eval_loss
    direction: str = "auto"  # maximize | minimize | auto (minimize losses and errors, maximize the rest)

    def __post_init__(self):
        if self.direction not in ("maximize", "minimize", "auto"):
            raise AlignError(
                f"sweep.direction={self.direction!r} is not valid: use maximize, minimize or auto"
            )


DIST_NAMES = ("ddp", "fsdp", "zero2", "zero3")


@dataclass
class DistConfig:
    """How the processes of a `torchrun` launch share the work (`dist=ddp|fsdp|zero2|zero3`, see dist.py)."""

    name: str = "ddp"
    # Recompute activations in the backward pass (FSDP's own for fsdp); null: on with a GPU, as for ddp.
    activation_checkpointing: bool | None = None
    cpu_offload: bool = False  # fsdp: keep parameters and gradients on the CPU between uses
    config: str | None = None  # zero2/zero3: a DeepSpeed JSON file (null: conf/deepspeed/<name>.json)

    def __post_init__(self):
        if self.name not in DIST_NAMES:
            raise AlignError(f"dist={self.name!r} is not valid: use {', '.join(DIST_NAMES)}")


@dataclass
class MethodSettings:
    """The keys every `method=<name>` has; each method's `Settings` adds its own.

    Hydra checks key names and value types when composing; `__post_init__` (run by
    `method_settings`, which `compose_checked` and `run_checks.checked_config` call) checks the
    values, raising a one-line AlignError that names `method.<key>=<value>` and what is valid.
    """

    name: str = ""
    dataset_type: str | None = None  # the standard dataset type the method trains on (data/formats.py)
    sample: str | None = None  # the file of data_samples/ read when data.path is null
    # Trainer settings: the fields of the method's TRL config class (which checks them).
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .data.formats import STANDARD_FORMATS

        if self.dataset_type not in STANDARD_FORMATS:
            raise AlignError(
                f"method.dataset_type={self.dataset_type} is not valid for method={self.name}: use one of "
                f"{', '.join(STANDARD_FORMATS)} (the dataset type it trains on; data.format is the input layout)"
            )


def one_of(key: str, value: Any, valid, what: str = "") -> None:
    """Raises `method.<key>=<value> is not valid: use one of ...` unless `value` is in `valid`."""
    if value not in valid:
        raise AlignError(
            f"method.{key}={value!r} is not valid: use {what or 'one of ' + ', '.join(valid)}"
            f"{nearest(str(value), valid)}"
        )


@dataclass
class AlignConfig:
    """The root of every composed config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: Any = None
    reward: Any = None
    seed: int = 42
    output_dir: str | None = None  # null: Hydra's run directory
    sweep: SweepConfig = field(default_factory=SweepConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    resume: Any = False  # false, true (the run folder's last checkpoint) or a checkpoint path
    debug: bool = False  # show full tracebacks
    plot: bool = True
    quiet: bool = False  # no progress bar or evaluation lines (`align train -q`); records still in train.log
    verbose: bool = False  # transformers' own display: every key of every logged record


def run_stamp() -> str:
    """The run folder's time stamp, identical in every process of one `torchrun` launch.

    Each rank composes its own config; `${now:}` could straddle a second between ranks and
    split one run over two folders. Ranks of one launch share a parent process (torchrun's
    agent), so the first rank writes the stamp to a file keyed by that parent and the others
    read it. Multi-node runs must set `hydra.run.dir` to a shared path anyway.
    """
    import os
    import tempfile
    import time

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return stamp
    key = f"{os.getppid()}-{os.environ.get('MASTER_PORT', '')}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    path = Path(tempfile.gettempdir()) / f"align-run-stamp-{key}"
    try:
        if path.exists() and time.time() - path.stat().st_mtime > 120:
            path.unlink()  # left by an earlier launch whose agent had the same pid
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, stamp.encode())
        os.close(fd)
        return stamp
    except FileExistsError:
        for _ in range(100):
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.05)
    return stamp


def register() -> None:
    """Registers the schema; safe to call more than once."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from .methods import REGISTRY, settings_class

    store = ConfigStore.instance()
    store.store(name="align_schema", node=AlignConfig)
    for name in REGISTRY:  # conf/method/<name>.yaml: `defaults: [schema/<name>@_here_, _self_]`
        store.store(group="method/schema", name=name, node=settings_class(name))
    if not OmegaConf.has_resolver("samples"):
        # `${samples:dpo.jsonl}` -> the absolute path of a shipped sample file.
        OmegaConf.register_new_resolver("samples", lambda name: str(SAMPLES_DIR / name))
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


# Keys under these prefixes belong to TRL's config dataclasses, which validate them (and we turn
# their complaint into a one-line error); Hydra would otherwise insist on `+` for every key the
# method yaml does not list (`method.args` is an open dict in `MethodSettings`). `++` adds or
# overrides, so the user never needs to know which.
OPEN_PREFIXES = ("method.args.", "data.columns.", "data.ptx_columns.", "reward.timeout")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Prepares command-line overrides for Hydra.

    - `method.args.k=v` becomes `++method.args.k=v`;
    - a method's `default_reward` (its settings class's default) becomes `reward=<option>` when the
      command line chooses no reward (Hydra cannot let one group's option pick another's default), so
      `align train method=grpo` runs as is and `--cfg job` shows the reward really used.
    """
    out = [f"++{o}" if o.startswith(OPEN_PREFIXES) and "=" in o else o for o in overrides]
    methods = [o.split("=", 1)[1] for o in out if o.startswith("method=")]
    # `reward.timeout` is a setting of the rewards, not a choice of one.
    chosen = any(
        o.lstrip("+~").startswith("reward") and not o.lstrip("+~").startswith("reward.timeout") for o in out
    )
    if len(methods) == 1 and not chosen:
        default = _method_default_reward(methods[0])
        if default:  # placed first: Hydra's parser takes no override after `--cfg job`
            out.insert(0, f"reward={default}")
    return out


def _method_default_reward(name: str) -> str | None:
    """The reward option a method uses when the command line names none (its settings class's
    `default_reward`), or None: a method that takes no reward, a sweep over methods, an unknown one."""
    from .methods import REGISTRY, settings_class

    if name not in REGISTRY:  # `dpo,kto` (a sweep) or a typo: Hydra reports the latter
        return None
    default = getattr(settings_class(name), "default_reward", None)
    return str(default) if default else None


def method_settings(node) -> dict[str, Any]:
    """The checked settings of a composed `method` node, as a plain dict (`MethodContext.method`).

    Hydra has checked the names of the keys the method yaml and its schema list and the types of
    their values; this also refuses keys added with `+` that the settings class does not have
    (Hydra adds them silently), and runs the class's own checks of the values (`__post_init__`),
    which also fill what follows from other keys (rm's dataset type and sample follow its mode).

    Raises:
        AlignError: an unknown key (with the nearest valid ones), a value the class refuses.
    """
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .errors import one_line
    from .methods import REGISTRY, settings_class

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    name = values.get("name")
    if name not in REGISTRY:
        raise AlignError(f"unknown method '{name}': choose one of {', '.join(REGISTRY)}")
    cls = settings_class(name)
    _refuse_unknown(values, cls, "method", name)
    try:
        # Merging into the schema checks the types of a config that was not composed (a saved one).
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise AlignError(f"method.{key}: {one_line(getattr(err, 'msg', '') or str(err))}") from None
    return dataclasses.asdict(settings)


def _refuse_unknown(values: dict, cls: type, prefix: str, name: str) -> None:
    """Raises for the first key of `values` (nested dataclass fields too) that `cls` lacks."""
    import dataclasses
    import typing

    from .errors import unknown_key

    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in valid:
            raise AlignError(unknown_key(f"{prefix}.{key}", str(key), valid, name))
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            _refuse_unknown(value, hint, f"{prefix}.{key}", name)
