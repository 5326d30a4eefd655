"""Every method x {full, LoRA, QLoRA} as users run it: the default evaluation split, an evaluation
before the first optimizer step, and weights that actually moved.

The 4-bit column is the one that broke on CPUs with AVX512-BF16 (bitsandbytes repacks a 4-bit
weight for inference in eval mode; see align_cli/compat/): there an evaluation pass followed
by a training step crashed, or passed no gradient back through the quantized layers.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import snapshot

from align_cli.testing import compose
from align_cli.train import train

METHODS = ["sft", "rm", "dpo", "kto", "grpo", "ppo"]
SETUPS = {"full": [], "lora": ["peft=lora", "peft.r=4"], "qlora": ["peft=lora", "peft.r=4", "quant=4bit"]}
# Two or three optimizer steps, evaluated first (eval_on_start) and at the default schedule's points.
# data.eval_ratio is left at its default: the evaluation split is on, as for a user.
SHORT = {
    "sft": ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4"],
    "rm": ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4"],
    "dpo": ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4"],
    "kto": ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4"],
    "grpo": [
        "method.args.max_steps=2",
        "method.args.num_generations=2",
        "method.args.per_device_train_batch_size=4",
        "method.args.per_device_eval_batch_size=4",
        "method.args.max_completion_length=8",
    ],
    "ppo": [
        "method.args.max_steps=2",
        "method.args.per_device_train_batch_size=4",
        "method.args.num_mini_batches=1",
        "method.args.num_ppo_epochs=2",
        "method.args.max_new_tokens=8",
    ],
}


def trained_model(trainer):
    """The model the method trains: PPO's policy, else the trainer's model."""
    return getattr(trainer, "policy", None) or trainer.model


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_with_evaluation_on(method, setup, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    import align_cli.methods.base as base

    loaded = []
    load = base.MethodContext.load_model

    def load_and_snapshot(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        loaded.append((model, snapshot(model)))
        return model

    monkeypatch.setattr(base.MethodContext, "load_model", load_and_snapshot)
    overrides = [
        f"method={method}",
        *SETUPS[setup],
        *SHORT[method],
        "method.args.eval_on_start=true",
        "plot=false",
    ]
    result = train(compose(overrides, tmp_path))

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    assert evals and evals[0]["step"] == 0, f"no evaluation before the first step: {evals[:1]}"
    steps = [r["step"] for r in records if "loss" in r]
    assert steps and max(steps) == result.trainer.state.global_step
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert any(k.startswith("eval_") for k in summary), summary

    model = trained_model(result.trainer)
    if setup == "full":
        before = next(snap for m, snap in loaded if m is model)
        after = dict(model.named_parameters())
        moved = [n for n, t in before.items() if not torch.equal(after[n].detach().float(), t)]
        assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors moved"
        return
    params = dict(model.named_parameters())
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert lora_b, "no LoRA adapter"
    still = [n for n, p in lora_b.items() if p.abs().sum() == 0]
    assert not still, f"{len(still)} of {len(lora_b)} LoRA B matrices never moved: {still[:3]}"
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable), trainable
    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantized == (setup == "qlora")
    if setup == "lora":  # base weights as loaded (a LoRA-wrapped Linear keeps them in base_layer)
        before = next(snap for m, snap in loaded if m is model.get_base_model())
        base_after = {n: p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
        for name, value in before.items():
            head, _, leaf = name.rpartition(".")
            key = name if name in base_after else f"{head}.base_layer.{leaf}"
            if key not in base_after:  # a head peft keeps as modules_to_save (the RM's score)
                continue
            assert torch.equal(base_after[key].detach().float(), value), f"base weight {name} moved"


def _lora_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training step of the tiny model in 4-bit, as align loads it."""
    from peft import get_peft_model

    from align_cli.config import ModelConfig, PeftConfig, QuantConfig
    from align_cli.modeling import load_model, lora_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same LoRA initialisation and input for both calls
        model = load_model(ModelConfig(), QuantConfig(bits=4, compute_dtype="float32"))
        model = get_peft_model(model, lora_config(PeftConfig(method="lora", r=4, dropout=0.0)))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero, so gradients reach the A matrices and the inputs
                param.data.normal_(0, 0.1)
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_qlora_gradients_are_the_same_after_an_evaluation_pass():
    """An eval pass must not change what the next training step computes, on any CPU."""
    plain, after_eval = _lora_gradients(False), _lora_gradients(True)
    assert set(plain) == set(after_eval) and len(plain) == len([n for n in plain if "lora_" in n]), (
        "some LoRA weights got no gradient"
    )
    for name, grad in plain.items():
        torch.testing.assert_close(after_eval[name], grad, msg=f"gradient of {name} changed after eval")


def test_preflight_refuses_a_4bit_kernel_that_cannot_train(monkeypatch):
    """Without align's workaround an AVX512-BF16 CPU fails the check; anywhere, a failing check
    is one line naming the problem, before any data or weights are read."""
    import bitsandbytes.functional as bnbf

    from align_cli import compat
    from align_cli.compat import libs
    from align_cli.config import PeftConfig, QuantConfig
    from align_cli.errors import AlignError
    from align_cli.run_checks import preflight_quant

    quant, peft = QuantConfig(bits=4), PeftConfig(method="lora")
    preflight_quant(quant, peft)  # with the workaround: fine on every machine
    monkeypatch.setattr(libs, "keep_4bit_trainable", lambda model: 0)  # where check_4bit_training looks
    if bnbf.has_avx512bf16():
        problem = compat.check_4bit_training("cpu", "nf4", torch.float32)
        assert problem and "after an evaluation pass" in problem
    monkeypatch.setattr(
        compat, "check_4bit_training", lambda *a: "no gradient reached LoRA A after an evaluation pass"
    )
    with pytest.raises(
        AlignError, match=r"quant=4bit: bitsandbytes .* cannot train .*no gradient reached LoRA A"
    ):
        preflight_quant(quant, peft)
