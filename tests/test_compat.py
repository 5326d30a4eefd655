"""The library internals align relies on (align_cli/compat/) still exist as written.

A failure here after a library upgrade names the private method, attribute or message that
changed; compat/ says what align does with it and which version it was written against.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from align_cli import compat


def _owner(where: str):
    module_name, _, qualname = where.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else []:
        obj = getattr(obj, part)
    return obj


def _source(owner) -> str:
    """The owner's source, with every base class's (an attribute may be set in a base's __init__)."""
    if inspect.ismodule(owner):
        return inspect.getsource(owner)
    texts = []
    for cls in inspect.getmro(owner):
        if cls is object:
            continue
        try:
            texts.append(inspect.getsource(cls))
        except (OSError, TypeError):  # a builtin or C base
            pass
    return "\n".join(texts)


def test_every_internal_is_listed_once():
    keys = [(i.owner, i.name) for i in compat.INTERNALS]
    assert len(keys) == len(set(keys))
    assert all(i.why for i in compat.INTERNALS)


@pytest.mark.parametrize("internal", compat.INTERNALS, ids=lambda i: f"{i.owner}.{i.name}")
def test_internal_still_exists(internal):
    owner = _owner(internal.owner)
    if internal.params is None:
        # An attribute: the owner (or a base) still assigns it, `x.<name> = ...` or `x.<name>: T = ...`.
        # (or, for a class attribute, `<name> = ...` in a class body)
        assigned = re.compile(rf"(\.|^\s+){re.escape(internal.name)}\s*(:[^=\n]*)?=[^=]", re.MULTILINE)
        assert assigned.search(_source(owner)), f"{internal.owner} no longer assigns .{internal.name}"
        return
    assert hasattr(owner, internal.name), f"{internal.owner} has no {internal.name} any more"
    params = [
        p.name
        for p in inspect.signature(getattr(owner, internal.name)).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert tuple(params) == internal.params, f"{internal.owner}.{internal.name}{tuple(params)}"


def test_the_metrics_dicts_have_train_and_eval():
    # trl_logged_metrics indexes them by mode.
    for name in ("DPOTrainer", "GRPOTrainer", "RewardTrainer"):
        source = inspect.getsource(_owner(f"trl:{name}").__init__)
        assert re.search(
            r'self\._metrics = \{"train": defaultdict\(list\), "eval": defaultdict\(list\)\}', source
        ), name


def test_hydra_parser_has_the_flags_align_reads():
    args = compat.hydra_args_parser().parse_intermixed_args(["-m", "method=dpo", "seed=1"])
    missing = [flag for flag in compat.HYDRA_FLAGS if not hasattr(args, flag)]
    assert not missing, f"Hydra's parser lost {missing}"
    assert args.multirun and args.overrides == ["method=dpo", "seed=1"]


def _composition_error(overrides: list[str]) -> Exception:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align_cli import config as schema

    schema.register()
    GlobalHydra.instance().clear()
    with pytest.raises(Exception) as caught:  # noqa: B017 - which one is what this test looks at
        with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    return caught.value


def test_hydra_messages_are_recognised():
    """Each message compat recognises, produced by the real Hydra on align's config tree."""
    ambiguous = _composition_error(["method=dpo", "seed=1,2"])
    assert compat.is_ambiguous_value(str(ambiguous))

    no_method = _composition_error([])
    assert compat.missing_choice(str(no_method), "method") == ["dpo", "grpo", "kto", "ppo", "rm", "sft"]
    assert compat.missing_choice(str(ambiguous), "method") is None

    wrong_type = _composition_error(["method=dpo", "model.max_length=abc"])
    assert compat.is_merge_error(str(wrong_type))
    assert not compat.is_unknown_key(wrong_type.__cause__)

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    with pytest.raises(Exception) as unquoted:  # noqa: B017 - Hydra's OverrideParseException
        parser.parse_override("data.system=你是助手")
    assert compat.is_unquoted_character_error(str(unquoted.value))
    parser.parse_override('data.system="你是助手"')  # quoted, it parses: the hint align gives works
    assert not compat.is_unquoted_character_error(str(ambiguous))

    typo = _composition_error(["method=dpo", "model.nme_or_path=x"])
    assert compat.is_unknown_key(typo.__cause__)
    assert not compat.is_merge_error(str(typo))


def test_grad_norm_is_observed_where_the_trainer_computes_it(tmp_path):
    """observe_grad_norm sees the norm transformers' loop computes before each optimizer step."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0]))

        def forward(self, x):
            return {"loss": (self.w * x).sum()}  # d loss / d w = sum(x)

    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, max_grad_norm=0.0, logging_strategy="no", dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = Trainer(
        model=Linear(), args=args, train_dataset=Dataset.from_list([{"x": 3.0}, {"x": 4.0}] * 2)
    )
    norms = []
    assert compat.observe_grad_norm(trainer, norms.append)
    trainer.train()
    assert [float(n) for n in norms] == pytest.approx([7.0, 7.0])
