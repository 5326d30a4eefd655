"""PPO's cheap memory options on the tiny model: the critic on the policy's own base
(`method.critic=shared`), the reward model offloaded between rollouts
(`method.args.offload_reward_model`), and the frozen roles in 4 bit (`method.frozen_quant=4bit`).
Each one trains through `train(compose(...))` as `align train method=ppo` does."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import changed, snapshot

from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train

# Two PPO steps of 8 prompts (micro-batch 4, 2 micro-batches per optimiser step).
SHORT = [
    "method.args.max_steps=2",
    "method.args.per_device_train_batch_size=4",
    "method.args.gradient_accumulation_steps=2",
    "method.args.num_mini_batches=1",
    "method.args.num_ppo_epochs=2",
    "method.args.max_new_tokens=8",
    "data.eval_ratio=0",
    "plot=false",
]
LORA = ["peft=lora", "peft.r=4"]


def ppo(tmp_path, *overrides: str, name: str = "run"):
    return train(compose(["method=ppo", *overrides], tmp_path / name)).trainer


def linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# --- the critic on the policy's base -----------------------------------------------------------


def test_shared_critic_trains_its_own_adapter_on_the_policys_base_weights(tmp_path, monkeypatch):
    """method.critic=shared: one copy of the base in memory; the critic's adapter and head train,
    the policy's adapter trains, the base stays frozen, and a checkpoint holds the critic's adapter."""
    from align_cli.ppo.models import shared_storage

    captured = {}
    import align_cli.ppo.models as models

    build = models.shared_base_critic

    def spy(policy, *args, **kwargs):
        critic = build(policy, *args, **kwargs)
        captured["critic"], captured["policy"] = snapshot(critic), snapshot(policy)
        return critic

    monkeypatch.setattr(models, "shared_base_critic", spy)
    trainer = ppo(tmp_path, *LORA, "method.critic=shared", "method.args.save_steps=2", *SHORT)
    policy, critic = trainer.policy, trainer.critic
    body = {n: p for n, p in critic.named_parameters() if "lora_" not in n and "score" not in n}
    policy_ptrs = {p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n}
    assert body and all(p.data_ptr() in policy_ptrs for p in body.values()), "a base weight was copied"
    total, distinct = shared_storage(policy, critic)
    policy_bytes = shared_storage(policy)[0]
    critic_own = sum(p.numel() * p.element_size() for n, p in critic.named_parameters() if "lora_" in n)
    critic_own += sum(p.numel() * p.element_size() for n, p in critic.named_parameters() if "score" in n)
    assert distinct == policy_bytes + critic_own < total  # the critic adds its adapter and head only
    # The two adapters live in separate modules: the critic's LoRA never enters the policy's forward.
    assert not {id(m) for m in critic.modules() if hasattr(m, "lora_A")} & {id(m) for m in policy.modules()}
    # Each role trained; the base did not (the value head started at 0).
    start = captured["critic"]
    assert all(t.abs().sum() == 0 for n, t in start.items() if n.startswith("score"))
    critic_lora_b = [p for n, p in critic.named_parameters() if "lora_B" in n]
    assert critic_lora_b and any(p.abs().sum() > 0 for p in critic_lora_b)
    head = [p for n, p in critic.named_parameters() if "score" in n and p.requires_grad]
    assert head and any(p.abs().sum() > 0 for p in head)
    policy_lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in policy_lora_b)
    base = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p for n, p in body.items()}
    for name, before in start.items():
        if name in base:
            assert torch.equal(base[name].float(), before), f"base weight {name} moved"
    checkpoint = tmp_path / "run" / "checkpoint-2" / "critic"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert trainer.ref_model is None  # the reference is still the policy with its adapter off


def test_shared_critic_under_qlora_shares_the_4bit_base(tmp_path):
    """quant=4bit peft=lora method.critic=shared: the critic's 4-bit layers hold the policy's packed weights."""
    trainer = ppo(tmp_path, *LORA, "quant=4bit", "method.critic=shared", *SHORT)
    policy, critic = trainer.policy, trainer.critic
    assert linear4bit_count(critic) == linear4bit_count(policy) > 0
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    packed = [p for n, p in critic.named_parameters() if p.dtype == torch.uint8]
    assert packed and all(p.data_ptr() in policy_ptrs for p in packed)
    assert any(p.abs().sum() > 0 for n, p in critic.named_parameters() if "lora_B" in n)


def test_shared_critic_values_match_a_separate_critic_with_the_same_weights():
    """The shared critic reads V(s_t) exactly as a separate seq-cls copy of the policy with the same head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align_cli.modeling import build_tiny_model
    from align_cli.ppo.models import critic_values, forward_inputs, shared_base_critic

    path = build_tiny_model()
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    critic = shared_base_critic(policy, pad_token_id=0).eval()
    separate = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        critic.score.weight.normal_()
        separate.score.weight.copy_(critic.score.weight)
    seqs = torch.randint(3, 500, (2, 9))
    inputs = forward_inputs(seqs, torch.ones_like(seqs))
    with torch.no_grad():
        torch.testing.assert_close(critic_values(critic, inputs, 4), critic_values(separate, inputs, 4))
    assert critic.model.embed_tokens.weight is policy.model.embed_tokens.weight


def test_shared_critic_mistakes_are_named(tmp_path, rm_run_folder):
    with pytest.raises(AlignError, match=r"method\.critic=shared needs peft=lora"):
        ppo(tmp_path, "method.critic=shared", *SHORT, name="a")
    with pytest.raises(AlignError, match=r"method\.critic='own' is not valid: use separate .* or shared"):
        ppo(tmp_path, "method.critic=own", *SHORT, name="b")
    reward = ["reward=model", f"reward.model.path={rm_run_folder}"]
    with pytest.raises(AlignError, match=r"cannot start from a reward model \(method\.critic_init=reward\)"):
        ppo(tmp_path, *LORA, *reward, "method.critic=shared", "method.critic_init=reward", *SHORT, name="c")
    # Under dist=fsdp (a torchrun launch, so checked here on the method's own check): refused.
    from types import SimpleNamespace

    from align_cli.config import DistConfig, PeftConfig
    from align_cli.methods.ppo import memory_problems

    method = {"critic": "shared", "critic_init": "auto", "frozen_quant": "4bit"}
    ctx = SimpleNamespace(method=method, peft_cfg=PeftConfig(method="lora"), dist=DistConfig(name="fsdp"))
    problems = memory_problems(ctx)
    assert len(problems) == 2 and "method.critic=shared is not supported with dist=fsdp" in problems[0]
    assert "method.frozen_quant=4bit is not supported with dist=fsdp" in problems[1]
    assert memory_problems(SimpleNamespace(**{**vars(ctx), "dist": DistConfig()})) == []
    with pytest.raises(AlignError, match=r"method\.frozen_quant='8bit' is not valid: use none or 4bit"):
        ppo(tmp_path, "method.frozen_quant=8bit", *SHORT, name="d")
    with pytest.raises(AlignError, match=r"reward\.model\.quant='2bit' is not valid: use none .* or 4bit"):
        ppo(tmp_path, *reward, "reward.model.quant=2bit", *SHORT, name="e")


# --- the reward model offloaded between rollouts --------------------------------------------------


def test_offloaded_reward_model_visits_the_device_only_to_score(tmp_path, monkeypatch, rm_run_folder):
    """With an accelerator (simulated: `can_offload` says yes on this CPU), the reward model waits in CPU
    memory and moves to the device around each scoring call (training and evaluation), never while the
    policy samples or trains."""
    import align_cli.ppo.experience as experience
    from align_cli.rewards.model import ModelReward

    events: list[str] = []
    monkeypatch.setattr(experience, "can_offload", lambda device: True)
    to, compute = ModelReward.to, ModelReward.compute

    def spy_to(self, device):
        events.append(f"to {'cpu' if device == 'cpu' else 'device'}")
        return to(self, device)

    def spy_compute(self, *args, **kwargs):
        events.append("score")
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(ModelReward, "to", spy_to)
    monkeypatch.setattr(ModelReward, "compute", spy_compute)
    for name in ("sample", "forward_passes"):
        method = getattr(experience.ExperienceMaker, name)

        def spy(self, *args, _method=method, _name=name, **kwargs):
            events.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(experience.ExperienceMaker, name, spy)
    reward = ["reward=model", f"reward.model.path={rm_run_folder}", "method.critic_init=policy"]
    overrides = [*reward, "method.args.offload_reward_model=true", *SHORT, "data.eval_ratio=0.1"]
    trainer = ppo(tmp_path, *overrides)
    assert trainer.experience_maker.offload
    assert events[0] == "to cpu"  # placed in CPU memory when the trainer is built
    trace = " | ".join(events[1:])
    assert trace.startswith("sample | to device | score"), trace
    # Train steps and evaluations: every scoring call (the probe's too) inside one visit, which
    # ends before the forward passes and the update; nothing is scored outside a visit.
    visits = trace.split("to device")[1:]
    assert len(visits) == 4, trace  # 2 steps + 2 evaluations
    for visit in visits:
        inside, back, after = visit.partition("to cpu")
        assert back and "score" in inside and "sample" not in inside and "forward_passes" not in inside
        assert "score" not in after
    assert trace.count("forward_passes") == 2
    steps = [r for r in trainer.state.log_history if "score" in r]
    assert len(steps) == 2 and steps[1]["kl"] != 0  # the policy trained
    assert next(trainer.reward_funcs[0].model.parameters()).device.type == "cpu"


def test_offload_on_a_cpu_is_a_no_op_said_in_the_log(tmp_path, caplog, rm_run_folder):
    reward = ["reward=model", f"reward.model.path={rm_run_folder}", "method.critic_init=policy"]
    with caplog.at_level(logging.INFO, logger="align"):
        trainer = ppo(tmp_path, *reward, "method.args.offload_reward_model=true", *SHORT)
    assert not trainer.experience_maker.offload
    assert "offload_reward_model: the run computes on the CPU" in caplog.text
    assert trainer.state.global_step == 2


# --- the frozen roles in 4 bit ------------------------------------------------------------------


def test_frozen_roles_in_4bit_while_the_policy_trains_whole(tmp_path, monkeypatch, rm_run_folder):
    """method.frozen_quant=4bit, full fine-tuning: the reference is a separate NF4 copy of the start,
    the reward model is NF4, the policy and critic stay full precision and train."""
    import align_cli.methods.base as base

    loaded = {}
    load = base.MethodContext.load_model

    def load_and_snapshot(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        if kwargs.get("kind", "causal_lm") == "causal_lm" and kwargs.get("quant_cfg") is None:
            loaded["policy"] = snapshot(model)
        return model

    monkeypatch.setattr(base.MethodContext, "load_model", load_and_snapshot)
    reward = ["reward=model", f"reward.model.path={rm_run_folder}"]
    trainer = ppo(tmp_path, *reward, "method.frozen_quant=4bit", *SHORT)
    assert linear4bit_count(trainer.ref_model) > 0 and linear4bit_count(trainer.reward_funcs[0].model) > 0
    assert linear4bit_count(trainer.policy) == 0 and linear4bit_count(trainer.critic) == 0
    assert len(changed(loaded["policy"], trainer.policy)) > len(loaded["policy"]) // 2
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    steps = [r for r in trainer.state.log_history if "score" in r]
    # At the first rollout the policy is its start: the KL is the 4-bit reference's rounding alone, small.
    assert 0 < abs(steps[0]["kl"]) < 0.05, steps[0]["kl"]  # measured: 1.5e-4 nats per response


def test_frozen_quant_under_lora_quantizes_the_reward_model_and_copies_no_reference(tmp_path, rm_run_folder):
    reward = ["reward=model", f"reward.model.path={rm_run_folder}"]
    trainer = ppo(tmp_path, *LORA, *reward, "method.frozen_quant=4bit", *SHORT)
    assert trainer.ref_model is None  # the policy with its adapter off, as without the option
    assert linear4bit_count(trainer.reward_funcs[0].model) > 0 and linear4bit_count(trainer.policy) == 0
    assert any(p.abs().sum() > 0 for n, p in trainer.policy.named_parameters() if "lora_B" in n)


def test_a_4bit_reward_model_scores_close_to_full_precision(rm_run_folder):
    """NF4 rounding moves the scores a little and keeps their order."""
    from align_cli.rewards.model import ModelReward

    full = ModelReward("model", path=str(rm_run_folder))
    nf4 = ModelReward("model", path=str(rm_run_folder), quant="4bit")
    assert linear4bit_count(nf4.model) > 0 and linear4bit_count(full.model) == 0
    prompts = [f"Question {i}: how do I {w}?" for i, w in enumerate(["cook", "swim", "read", "fly"] * 4)]
    completions = [f"{'Carefully, ' * (i % 4)}you {w} like this." for i, w in enumerate("abcdefghijklmnop")]
    a = torch.tensor(full(prompts=prompts, completions=completions))
    b = torch.tensor(nf4(prompts=prompts, completions=completions))
    spread = a.std()
    assert spread > 0
    assert (a - b).abs().max() < 0.4 * spread, (a, b)  # measured: 0.28 x spread
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98  # measured: 0.999


# --- the benchmark's accounting (scripts/bench_ppo_memory.py) -----------------------------------


def test_the_memory_benchmark_counts_each_roles_bytes(tmp_path, rm_run_folder):
    """role_bytes on real runs: full fine-tuning holds four full copies; LoRA + shared critic + 4-bit
    reward model holds one base, two adapters and a 4-bit reward model; the table renders both."""
    from align_cli.testing import load_script

    bench = load_script("bench_ppo_memory")
    reward = ["reward=model", f"reward.model.path={rm_run_folder}"]
    full = bench.role_bytes(ppo(tmp_path, *reward, *SHORT, name="full"))
    cheap_overrides = [*LORA, *reward, "method.critic=shared", "method.frozen_quant=4bit", *SHORT]
    cheap = bench.role_bytes(ppo(tmp_path, *cheap_overrides, name="cheap"))
    # Policy and reference: the causal LM (tied LM head); critic and reward model: the same body + a value head.
    assert full["policy"] == full["reference"] > 0 and full["critic"] == full["reward"]
    assert abs(full["critic"] - full["policy"]) < full["policy"] / 100
    assert full["trainable"] == full["policy"] + full["critic"]
    assert cheap["reference"] == 0 and 0 < cheap["critic"] < full["critic"] / 4
    assert 0 < cheap["reward"] < full["reward"] / 2 and cheap["policy"] > full["policy"]  # + its adapter
    entry = {"params": 1e6, "steps": 2, "machine": "test"}
    measured = dict.fromkeys(("anon_start_mb", "anon_peak_mb", "file_start_mb", "peak_rss_mb"), 1.0)
    runs = {"full": {"roles": full, **measured, "process_peak_rss_mb": 3.0}}
    runs["lora-shared-4bit-frozen"] = {**runs["full"], "roles": cheap}
    text = bench.markdown({"5m": {**entry, "results": runs}})
    assert text.startswith("## PPO memory: the four roles and the cheap options")
    assert "`method.critic=shared` `method.frozen_quant=4bit`" in text and "Machine: test." in text
