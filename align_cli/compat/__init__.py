"""Every place align touches a library's internals, with the version each touch was written against.

The rule: code outside this module uses only the public API of TRL, transformers, Hydra, OmegaConf,
bitsandbytes, accelerate and peft. When align needs a private method, a private attribute, a
monkeypatch or the text of a library's message, it goes here, as a small named function or a
documented subclass hook, with a comment saying which version it was written against and why no
public API does the job. `INTERNALS` lists every private name relied on; tests/test_compat.py
checks that each one still exists with the parameters listed, so a library upgrade fails one
clear test instead of a training run.

One package, one module per library family: `libs` (bitsandbytes, accelerate, import noise),
`hydra_parser` (Hydra's parser and message texts), `trainers` (TRL's and transformers' trainers);
everything is importable from `align_cli.compat`.

On an upgrade of a pinned library (pyproject.toml): run tests/test_compat.py, then read the
library's changes for each name it lists.

Nothing here imports torch, transformers, TRL, Hydra or bitsandbytes at module level, so
`align --help` stays instant; the subclasses are built on first use (`functools.cache`).
"""

from typing import NamedTuple

from .hydra_parser import (  # noqa: F401
    HYDRA_AMBIGUOUS,
    HYDRA_FLAGS,
    HYDRA_MERGE,
    HYDRA_NO_CHOICE,
    HYDRA_TOKEN_ERROR,
    OMEGACONF_NOT_IN,
    hydra_args_parser,
    is_ambiguous_value,
    is_merge_error,
    is_unknown_key,
    is_unquoted_character_error,
    missing_choice,
)
from .libs import (  # noqa: F401
    BNB_CPU_OPS_LOGGER,
    check_4bit_training,
    fsdp_on_cpu,
    keep_4bit_trainable,
    no_split_modules,
    outside_zero3,
    quiet_library_noise,
)
from .trainers import (  # noqa: F401
    grpo_trainer_base,
    install_atomic_trainer_state,
    load_checkpoint,
    loop_trainer_base,
    observe_grad_norm,
    reward_trainer_base,
    save_checkpoint,
    trl_logged_metrics,
)


class Internal(NamedTuple):
    """One private name of a library that align relies on.

    Attributes:
        owner: where it lives: `module:Class` for a method or attribute of a class, `module` for a
            module-level function.
        name: the attribute's name.
        params: for a callable, its parameter names in order (without `self`), as
            `inspect.signature` gives them; None for an attribute that the owner's source assigns
            (`self.<name> = ...` in the class or one of its bases, or `<obj>.<name> = ...` in the module).
        why: what align does with it (and where, when that is not this module).
    """

    owner: str
    name: str
    params: tuple[str, ...] | None
    why: str


_GRPO, _REWARD, _TRAINER = "trl:GRPOTrainer", "trl:RewardTrainer", "transformers:Trainer"
_PPO = "PPO's own loop (`loop_trainer_base`)"

# Written against trl 1.16.0, transformers 5.24.0, hydra-core 1.3.8 and bitsandbytes 0.50.2.
INTERNALS: tuple[Internal, ...] = (
    # TRL: GRPO's advantages (`grpo_trainer_base`).
    Internal(
        _GRPO,
        "_calculate_rewards",
        ("inputs", "prompts", "completions", "completion_ids_list"),
        "keeps them (rank)",
    ),
    Internal(_GRPO, "_generate_and_score_completions", ("inputs",), "its advantages are replaced (rank)"),
    Internal(_GRPO, "_logs", None, "the completions table shows the advantages used"),
    # TRL: what the trainers log (`trl_logged_metrics`).
    Internal("trl:DPOTrainer", "_metrics", None, "evaluation means over rows, not over batches"),
    Internal(_REWARD, "_metrics", None, "pointwise/listwise training metrics; exact evaluation metrics"),
    Internal(_GRPO, "_metrics", None, "the ptx loss (methods/grpo.py) logged beside TRL's own metrics"),
    # TRL: the reward trainer's data layout (`reward_trainer_base`).
    Internal(
        _REWARD, "_prepare_dataset", ("dataset", "processing_class", "args", "dataset_name"), "our layouts"
    ),
    Internal(_REWARD, "_set_signature_columns_if_needed", (), "keeps the pointwise/listwise token columns"),
    Internal(_REWARD, "_signature_columns", None, "the columns remove_unused_columns keeps"),
    Internal(_REWARD, "_total_train_tokens", None, "num_tokens for the pointwise/listwise losses"),
    Internal(_REWARD, "_tp_size", None, "num_tokens counts a token once under tensor parallelism"),
    # transformers' Trainer (`reward_trainer_base`, `observe_grad_norm`, `save_checkpoint`, `load_checkpoint`).
    Internal(_TRAINER, "_prepare_inputs", ("inputs",), "the reward trainers' prediction_step"),
    Internal(_TRAINER, "_get_grad_norm", ("model", "grad_norm"), "the loss guard reads the Trainer's norm"),
    Internal(
        _TRAINER, "_save_checkpoint", ("model", "trial"), "a resume point off schedule; ppo/ overrides it"
    ),
    Internal(
        _TRAINER, "_load_from_checkpoint", ("resume_from_checkpoint", "model"), "weights, no training; PPO's"
    ),
    Internal("transformers:TrainerState", "save_to_json", ("json_path",), "replaced by an atomic write"),
    Internal(_TRAINER, "_load_rng_state", ("checkpoint",), _PPO),
    Internal(_TRAINER, "_save_optimizer_and_scheduler", ("output_dir",), f"{_PPO} under dist=fsdp"),
    Internal(_TRAINER, "_load_optimizer_and_scheduler", ("checkpoint",), _PPO),
    Internal(_TRAINER, "_load_callback_state", (), _PPO),
    Internal(_TRAINER, "_get_learning_rate", (), _PPO),
    Internal(_TRAINER, "_get_output_dir", ("trial",), _PPO),
    Internal(_TRAINER, "_move_model_to_device", ("model", "device"), _PPO),
    # transformers' models (`no_split_modules`, for dist=fsdp's auto-wrap).
    Internal("transformers:PreTrainedModel", "_no_split_modules", None, "the decoder layer FSDP wraps"),
    # transformers' DeepSpeed integration (`outside_zero3`).
    Internal(
        "transformers.integrations.deepspeed",
        "_hf_deepspeed_config_weak_ref",
        None,
        "the live ZeRO-3 config, set aside while reward models load whole",
    ),
    # Hydra (`hydra_args_parser`).
    Internal("hydra._internal.utils", "get_args_parser", (), "align reads Hydra's flags before Hydra starts"),
    # bitsandbytes (`keep_4bit_trainable`).
    Internal(
        "bitsandbytes.functional",
        "_convert_weight_packed_for_cpu_inverse",
        ("packed_weight", "quant_state", "block_n"),
        "unpacks a 4-bit weight repacked for the CPU inference kernel",
    ),
    Internal("bitsandbytes.nn:Linear4bit", "support_avx512bf16_for_cpu", None, "gates that repacking"),
    Internal("bitsandbytes.functional", "packing_format_for_cpu", None, "says a weight was repacked"),
)
