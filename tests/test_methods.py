"""SFT, DPO and KTO train a few steps on the tiny model; outputs load back with transformers/peft."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import changed, snapshot

from align_cli.testing import compose
from align_cli.train import train

STEPS = ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4", "data.eval_ratio=0"]


def run(tmp_path, overrides, monkeypatch):
    """Trains and returns (result, parameter snapshot taken right after the model was built)."""
    import align_cli.methods.base as base

    captured = {}
    original = base.MethodContext.load_model

    def load_and_snapshot(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        captured["before"] = snapshot(model)
        return model

    monkeypatch.setattr(base.MethodContext, "load_model", load_and_snapshot)
    result = train(compose([*overrides, *STEPS], tmp_path))
    return result, captured["before"]


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_full_finetune_moves_weights_and_reloads(method, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    result, before = run(tmp_path, [f"method={method}"], monkeypatch)
    model = result.trainer.model
    moved = changed(before, model)
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors moved"
    assert result.trainer.state.global_step == 3

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, dict(model.named_parameters())[name].detach())
    # The run folder is self-contained: config, tokenizer with chat template, metrics, summary.
    assert (tmp_path / "tokenizer_config.json").exists() and (tmp_path / "chat_template.jinja").exists()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == method and summary["metrics"]["global_step"] == 3
    svg = (tmp_path / "training_curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") >= 1 and ">loss</text>" in svg
    card = (tmp_path / "README.md").read_text()  # ours, not TRL's "fine-tuned version of [None]"
    assert "<!-- written by align -->" in card and f"`method={method}`" in card and "[None]" not in card


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_lora_moves_only_adapter_weights(method, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel

    result, before = run(tmp_path, [f"method={method}", "peft=lora", "peft.r=4"], monkeypatch)
    model = result.trainer.model
    assert isinstance(model, PeftModel)
    # `before` was taken on the bare model; map the base weights to their names inside the PeftModel.
    base_after = {n: p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    for name, value in before.items():
        head, _, leaf = name.rpartition(".")
        key = name if name in base_after else f"{head}.base_layer.{leaf}"  # LoRA-wrapped Linear
        assert torch.equal(base_after[key].detach().float(), value), f"base weight {name} moved"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices never left zero"
    if method in ("dpo", "kto"):
        # The reference is the base with adapters disabled: no second copy of the weights.
        assert result.trainer.ref_model is None

    assert (tmp_path / "adapter_config.json").exists() and not (tmp_path / "model.safetensors").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_B" in n}
    assert saved and any(p.abs().sum() > 0 for p in saved.values())


def test_qlora_uses_bitsandbytes_4bit_layers(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    result, _ = run(tmp_path, ["method=dpo", "peft=lora", "peft.r=4", "quant=4bit"], monkeypatch)
    model = result.trainer.model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no bitsandbytes 4-bit layer in a quant=4bit model"
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    assert result.trainer.state.global_step == 3 and (tmp_path / "adapter_config.json").exists()


def test_8bit_lora_trains(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    result, _ = run(tmp_path, ["method=sft", "peft=lora", "peft.r=4", "quant=8bit"], monkeypatch)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in result.trainer.model.modules())
    assert result.trainer.state.global_step == 3


@pytest.mark.slow
def test_dpo_learns_the_sample_preferences(tmp_path):
    """Held-out pairs: the implicit reward ranks chosen above rejected well above chance (0.5)."""
    result = train(compose(["method=dpo", "data.eval_ratio=0.2"], tmp_path))
    metrics = result.metrics
    assert metrics["eval_rewards/accuracies"] >= 0.85, metrics
    assert metrics["eval_rewards/margins"] > 0.5, metrics
    assert metrics["loss_last_step"] < 0.5 * metrics["loss_first_step"], metrics


def test_dpo_eval_metrics_are_means_over_rows_whatever_the_batch_size(tmp_path):
    """11 eval pairs in batches of 3 (a short last batch) give the same eval metrics as batches of 1."""
    out = tmp_path / "run"
    overrides = ["method=dpo", "method.args.max_steps=1", "method.args.per_device_eval_batch_size=3"]
    result = train(compose([*overrides, "data.eval_ratio=0.1", "plot=false"], out))
    trainer = result.trainer
    assert len(trainer.eval_dataset) % 3 != 0
    batched = trainer.evaluate()
    trainer.args.per_device_eval_batch_size = 1
    single = trainer.evaluate()
    for key in (
        "eval_logps/chosen",
        "eval_logps/rejected",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
    ):
        assert batched[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
