"""A LoRA run folder as the start of the next stage (SFT adapter -> PPO / DPO, RM adapter -> critic).

The folder holds only an adapter. Each later stage must start from what that run trained:
as a full model, quantized, as a critic (another head type), and as the base of a new
adapter whose saved config names the weights it was trained on.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from align_cli.testing import compose
from align_cli.train import train

PPO_SHORT = [
    "method=ppo",
    "method.args.max_steps=2",
    "method.args.per_device_train_batch_size=4",
    "method.args.num_mini_batches=1",
    "method.args.max_new_tokens=8",
    "data.eval_ratio=0",
    "plot=false",
]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """An SFT LoRA run folder whose adapter visibly changes the model (high LR, B != 0)."""
    path = tmp_path_factory.mktemp("sft_lora")
    overrides = [
        "method=sft",
        "peft=lora",
        "peft.r=4",
        "method.args.max_steps=4",
        "method.args.learning_rate=0.05",
    ]
    train(compose([*overrides, "data.eval_ratio=0", "plot=false"], path))
    assert (path / "adapter_config.json").exists() and not (path / "model.safetensors").exists()
    return path


@pytest.fixture(scope="module")
def rm_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm_lora")
    overrides = ["method=rm", "peft=lora", "peft.r=4", "method.args.max_steps=2"]
    train(
        compose(
            [*overrides, "method.args.per_device_train_batch_size=4", "data.eval_ratio=0", "plot=false"], path
        )
    )
    return path


@pytest.fixture
def rule_reward(tmp_path, monkeypatch):
    (tmp_path / "stage_rewards.py").write_text(
        textwrap.dedent(
            """
            def short(completions, **kwargs):
                return [-len(c if isinstance(c, str) else c[-1]["content"]) / 10 for c in completions]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield ["reward=function", "reward.function.path=stage_rewards:short"]
    sys.modules.pop("stage_rewards", None)


def merged(adapter_dir):
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(adapter_dir).merge_and_unload()


def logits(model, tokenizer, text="Hello, how are you?"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def test_ppo_full_finetune_from_an_sft_adapter_starts_from_its_weights(tmp_path, rule_reward, sft_adapter):
    """The critic (from the policy: a rule reward) loads as a classifier from a causal-LM adapter."""
    result = train(compose([*PPO_SHORT, *rule_reward, f"model.name_or_path={sft_adapter}"], tmp_path / "run"))
    trainer = result.trainer
    expected = merged(sft_adapter).state_dict()
    for name, param in trainer.ref_model.named_parameters():  # the frozen reference = the SFT model
        torch.testing.assert_close(param.float(), expected[name].float())
    moved = [
        n for n, p in trainer.policy.named_parameters() if not torch.equal(p.float(), expected[n].float())
    ]
    assert len(moved) > 10, "the policy did not train"
    critic = trainer.critic.model.layers[0].mlp.up_proj.weight
    assert critic.shape == expected["model.layers.0.mlp.up_proj.weight"].shape
    assert not list(tmp_path.glob("run/.merged-*")), "the scratch merge was left behind"


def test_a_new_lora_on_an_sft_adapter_names_the_merged_sft_model_as_its_base(
    tmp_path, rule_reward, sft_adapter
):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = train(compose([*PPO_SHORT, *rule_reward, "peft=lora", f"model.name_or_path={sft_adapter}"], out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())
    tokenizer = AutoTokenizer.from_pretrained(out)
    # What peft loads from the run folder is the trained policy: SFT weights + the PPO adapter.
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    policy = result.trainer.policy.eval()
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(policy, tokenizer), atol=1e-5, rtol=1e-4)
    # ... and not the raw base + the PPO adapter, which differs visibly.
    sft = logits(merged(sft_adapter), tokenizer)
    raw_base = json.loads((sft_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (sft - logits(AutoModelForCausalLM.from_pretrained(raw_base), tokenizer)).abs().max() > 1e-2


def test_full_dpo_from_an_sft_adapter_trains_every_weight(tmp_path, sft_adapter):
    out = tmp_path / "run"
    result = train(
        compose(
            ["method=dpo", f"model.name_or_path={sft_adapter}", "method.args.max_steps=2", "plot=false"], out
        )
    )
    start = merged(sft_adapter).state_dict()
    params = dict(result.trainer.model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert sum(not torch.equal(p.float(), start[n].float()) for n, p in params.items()) > len(params) // 2


def test_qlora_dpo_from_an_sft_adapter(tmp_path, sft_adapter):
    import bitsandbytes as bnb

    out = tmp_path / "run"
    overrides = ["method=dpo", "peft=lora", "peft.r=4", "quant=4bit", f"model.name_or_path={sft_adapter}"]
    result = train(compose([*overrides, "method.args.max_steps=2", "data.eval_ratio=0", "plot=false"], out))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.trainer.model.modules())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())


def test_qlora_ppo_critic_from_a_lora_reward_model(tmp_path, rm_adapter):
    import bitsandbytes as bnb

    overrides = [*PPO_SHORT, "reward=model", f"reward.model.path={rm_adapter}", "peft=lora", "quant=4bit"]
    result = train(compose([*overrides, "method.critic_init=reward"], tmp_path / "run"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.trainer.critic.modules())
    assert result.trainer.state.global_step == 2


def test_a_reward_model_is_refused_as_the_policy(tmp_path, rm_adapter):
    from align_cli.errors import AlignError

    full_rm = tmp_path / "rm_full"
    train(compose(["method=rm", "method.args.max_steps=1", "data.eval_ratio=0", "plot=false"], full_rm))
    for folder in (full_rm, rm_adapter):
        for method in ("sft", "dpo"):
            cfg = compose(
                [f"method={method}", f"model.name_or_path={folder}", "method.args.max_steps=1"],
                tmp_path / "x",
            )
            with pytest.raises(
                AlignError, match="is a reward model \\(a sequence classifier\\), not a language model"
            ):
                train(cfg)


def test_an_adapter_names_its_base_by_absolute_path(tmp_path, monkeypatch):
    """Trained from a relative model path, the adapter still loads from another directory."""
    import os

    from align_cli.modeling import build_tiny_model

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(build_tiny_model(), tmp_path)
    out = tmp_path / "run"
    overrides = ["method=sft", "peft=lora", f"model.name_or_path={relative}", "method.args.max_steps=1"]
    train(compose([*overrides, "data.eval_ratio=0", "plot=false"], out))
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, build_tiny_model())
