"""GRPO (seed 3.3): the rank advantage on hand-made groups, the trainer really using it, smoke
runs with each kind of reward (rule, user function, reward model) with LoRA and 4-bit, a
learning run, and the errors a user sees for a bad reward function."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from align_cli.errors import AlignError
from align_cli.rewards.advantage import average_ranks, rank_advantages
from align_cli.testing import compose
from align_cli.train import train

NAN = float("nan")
# A few steps, no held-out split: enough to see the wiring work.
SHORT = ["method.args.max_steps=3", "data.eval_ratio=0", "plot=false"]


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def moved(before: dict[str, torch.Tensor], model) -> set[str]:
    """Names (as before any LoRA wrapping) of the parameters that changed."""
    after = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    # PEFT renames the wrapped weights: base_model.model.<name> with .base_layer before .weight.
    after = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p for n, p in after.items()}
    return {n for n, t in before.items() if not torch.equal(after[n].detach().float(), t)}


def adapter_moved(model) -> bool:
    """LoRA's B matrices start at zero; training makes them non-zero."""
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    return bool(lora_b) and any(p.detach().abs().sum() > 0 for p in lora_b)


def run(tmp_path, overrides: list[str], monkeypatch):
    """Trains; returns (result, parameters right after the policy was loaded, metrics records)."""
    import align_cli.methods.base as base

    captured = {}
    load = base.MethodContext.load_model

    def load_and_snapshot(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        captured["before"] = params(model)
        return model

    monkeypatch.setattr(base.MethodContext, "load_model", load_and_snapshot)
    out = tmp_path / "run"
    result = train(compose(["method=grpo", *overrides], out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, captured["before"], [r for r in records if "reward" in r]


@pytest.fixture
def user_modules():
    """Forgets the user reward modules a test imported, so later tests import their own."""
    yield
    for name in ("grpo_user_rewards", "grpo_bad_rewards"):
        sys.modules.pop(name, None)


# --- the rank transform -------------------------------------------------------------------


def test_rank_advantage_hand_made_groups():
    # K = 4, ranks 1 (worst) .. 4 (best), mean rank 2.5, sample std over the group.
    rewards = torch.tensor(
        [
            0.1, 0.5, 0.3, 0.9,   # distinct: ranks 1,3,2,4 -> centred -1.5,.5,-.5,1.5; std sqrt(5/3)=1.2910
            1.0, 100., 1e6, -5.,  # scale is irrelevant: ranks 2,3,4,1
            2.0, 2.0, 5.0, 1.0,   # a tie shares ranks 2,3 -> 2.5,2.5,4,1; centred 0,0,1.5,-1.5; std sqrt(1.5)
            3.0, 3.0, 3.0, 3.0,   # all tied: no preference, zero advantage
            NAN, 1.0, 2.0, 0.5,   # unscored: left out (ranks 2,3,1 among three, std 1) and given 0
        ]
    )  # fmt: skip
    expected = [
        -1.161895, 0.387298, -0.387298, 1.161895,
        -0.387298, 0.387298, 1.161895, -1.161895,
        0.0, 0.0, 1.224745, -1.224745,
        0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 1.0, -1.0,
    ]  # fmt: skip
    torch.testing.assert_close(rank_advantages(rewards, 4), torch.tensor(expected), atol=1e-5, rtol=0)
    # K = 2: the better of two gets +1/sqrt(2), the same as TRL's z-score would.
    torch.testing.assert_close(
        rank_advantages(torch.tensor([0.0, 7.0]), 2), torch.tensor([-0.707107, 0.707107])
    )
    # Average ranks agree with scipy's "average" method.
    scipy_stats = pytest.importorskip("scipy.stats")
    values = torch.tensor([4.0, 1.0, 4.0, 2.0, 4.0, 0.0])
    expected_ranks = scipy_stats.rankdata(values.numpy(), method="average")
    torch.testing.assert_close(average_ranks(values), torch.tensor(expected_ranks, dtype=torch.float32))
    with pytest.raises(ValueError, match="groups of 4"):
        rank_advantages(torch.zeros(6), 4)


def test_rank_trainer_uses_rank_advantages(tmp_path):
    """GRPO with method.advantage=rank hands the trainer's loss the rank advantages, not TRL's z-scores."""
    import dataclasses

    from datasets import Dataset

    from align_cli import modeling
    from align_cli.config import ModelConfig, PeftConfig, QuantConfig
    from align_cli.methods import grpo
    from align_cli.methods.base import MethodContext

    # A reward that ignores the text: the 16 completions (4 prompts x K=4) get these rewards.
    (tmp_path / "fixed.py").write_text(
        "REWARDS = [0.0, 1.0, 2.0, 100.0,  3.0, 3.0, 7.0, 1.0,  5.0, 5.0, 5.0, 5.0,  None, 1.0, 2.0, 0.5]\n"
        "def fixed(prompts, completions, **kwargs):\n"
        "    return REWARDS[: len(completions)]\n"
    )
    tokenizer = modeling.load_tokenizer(ModelConfig())
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "answer": str(i)} for i in range(4)]
    ctx = MethodContext(
        method=dataclasses.asdict(grpo.Settings(advantage="rank")),
        args={"num_generations": 4, "per_device_train_batch_size": 16, "max_completion_length": 4},
        model_cfg=ModelConfig(),
        quant_cfg=QuantConfig(),
        peft_cfg=PeftConfig(),
        tokenizer=tokenizer,
        train_dataset=Dataset.from_list(rows),
        reward={"fixed": {"type": "function", "path": f"{tmp_path / 'fixed.py'}:fixed"}},
        output_dir=str(tmp_path / "run"),
    )
    trainer = grpo.build(ctx)
    assert isinstance(trainer, grpo.rank_advantage_trainer())
    trainer.model.train()
    batch = [row for row in rows for _ in range(4)]  # TRL's sampler: each prompt K times in a row
    advantages = trainer._generate_and_score_completions(batch)["advantages"]
    expected = [
        -1.161895, -0.387298, 0.387298, 1.161895,  # the outlier 100 counts as just "best"
        0.0, 0.0, 1.224745, -1.224745,
        0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 1.0, -1.0,
    ]  # fmt: skip
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-5, rtol=0)
    # TRL still logs the raw rewards: mean over the 15 scored completions.
    scored = [0.0, 1.0, 2.0, 100.0, 3.0, 3.0, 7.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 0.5]
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(sum(scored) / len(scored))


# --- smoke runs with each kind of reward ------------------------------------------------------


def test_rule_rewards_full_finetune(tmp_path, monkeypatch):
    """reward=mix: match against the sample's `answer` column, length and keyword, weighted."""
    result, before, records = run(tmp_path, ["reward=mix", *SHORT], monkeypatch)
    changed = moved(before, result.trainer.model)
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors moved"
    assert len(records) == 3
    for name in ("correct", "brevity", "politeness"):
        assert f"rewards/{name}/mean" in records[0]
    # GRPO optimises 1.0 * correct + 0.5 * brevity + 0.2 * politeness (conf/reward/mix.yaml).
    assert result.trainer.reward_weights.tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert (tmp_path / "run" / "model.safetensors").exists()
    # beta=0 (the default) keeps no reference, so no KL: the collapse watch says what it cannot see.
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["diagnostic_notes"]
    assert any("kl_runaway signature is not watched" in n for n in notes), notes
    card = (tmp_path / "run" / "README.md").read_text()  # ours, with the rewards it was trained on
    assert "Group Relative Policy Optimization" in card and "| `reward.correct.weight` | 1 |" in card


def test_user_function_with_lora_rank_and_plain_prompts(tmp_path, monkeypatch, user_modules):
    """A user function gets the extra `answer` column; LoRA moves only the adapter weights."""
    from align_cli.config import SAMPLES_DIR

    (tmp_path / "grpo_user_rewards.py").write_text(
        textwrap.dedent(
            """
            import json

            def has_answer(prompts, completions, answer, **kwargs):
                with open("seen.jsonl", "a") as f:
                    f.write(json.dumps({"answer": answer, "keys": sorted(kwargs)}) + "\\n")
                return [len(c[0]["content"]) / 100 + (a in c[0]["content"]) for c, a in zip(completions, answer)]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    overrides = [
        "reward=function",
        "reward.function.path=grpo_user_rewards:has_answer",
        "method.advantage=rank",
        f"data.path={SAMPLES_DIR / 'grpo_prompts_plain.jsonl'}",
        "peft=lora",
        "peft.r=4",
        *SHORT,
    ]
    result, before, records = run(tmp_path, overrides, monkeypatch)
    assert not moved(before, result.trainer.model) and adapter_moved(result.trainer.model)
    assert len(records) == 3 and "rewards/function/mean" in records[0]
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    # Every call got one answer per completion, from the data file, plus TRL's extras.
    answers = {row["answer"] for row in map(json.loads, (SAMPLES_DIR / "grpo_prompts_plain.jsonl").open())}
    assert all(len(call["answer"]) == 8 and set(call["answer"]) <= answers for call in seen)
    assert "trainer_state" in seen[0]["keys"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_async_user_function_and_log_metric(tmp_path, monkeypatch, user_modules):
    """An `async def` reward function (TRL allows them) trains through our wrapper, and what it
    gives TRL's `log_metric` reaches metrics.jsonl."""
    (tmp_path / "grpo_user_rewards.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            async def judged(prompts, completions, log_metric, **kwargs):
                await asyncio.sleep(0)  # e.g. a judge model's API
                lengths = [len(c[0]["content"]) for c in completions]
                log_metric("judge/mean_length", sum(lengths) / len(lengths))
                return [n / 100 for n in lengths]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    overrides = ["reward=function", "reward.function.path=grpo_user_rewards:judged", *SHORT]
    _, _, records = run(tmp_path, overrides, monkeypatch)
    assert len(records) == 3 and all(r["judge/mean_length"] > 0 for r in records)
    assert records[0]["rewards/function/std"] > 0


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A tiny sequence-classification reward model saved like an `rm` run folder."""
    from align_cli import modeling
    from align_cli.config import ModelConfig

    path = tmp_path_factory.mktemp("rm")
    tokenizer = modeling.load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    model = modeling.load_model(ModelConfig(), kind="seq_cls", pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_chat_text(tiny_reward_model):
    """The reward-model reward equals the model's logit on the chat-formatted pair, batched or not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align_cli.rewards import build_reward_functions

    funcs, _ = build_reward_functions({"model": str(tiny_reward_model)})
    prompts = [[{"role": "user", "content": "What is 12 plus 30?"}], [{"role": "user", "content": "你好"}]]
    completions = [
        [{"role": "assistant", "content": "42, since 12 + 30 = 42."}],
        [{"role": "assistant", "content": "好"}],
    ]
    scores = funcs[0](prompts, completions)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        assert text.endswith("<|im_end|>\n") and completion[0]["content"] in text
        with torch.no_grad():
            logit = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
        assert score == pytest.approx(logit.item(), abs=1e-5)


def test_reward_model_with_lora_and_4bit(tmp_path, monkeypatch, tiny_reward_model):
    pytest.importorskip("bitsandbytes")
    overrides = ["reward=model", f"reward.model.path={tiny_reward_model}", "peft=lora", "quant=4bit", *SHORT]
    result, before, records = run(tmp_path, overrides, monkeypatch)
    assert adapter_moved(result.trainer.model)
    assert len(records) == 3 and "rewards/model/mean" in records[0]
    assert records[0]["rewards/model/std"] > 0  # the reward model tells completions apart


# --- learning ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["zscore", "rank"])
def test_length_reward_rises(tmp_path, monkeypatch, advantage):
    """A random tiny model learns to write longer text within 32 tokens (long BPE tokens).

    Reward 1 - |chars - 150| / 150 starts near 0.5 (about 75 characters in 32 tokens); within
    32 steps it climbs to about 0.9 with either advantage (0.86-0.92 over seeds 1-6 and 42).
    """
    overrides = [
        "reward=length",
        "reward.length.target=150",
        f"method.advantage={advantage}",
        "method.args.max_steps=32",
        "method.args.learning_rate=2e-2",
        "data.eval_ratio=0",
        "plot=false",
    ]
    _, _, records = run(tmp_path, overrides, monkeypatch)
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2 and last > 0.75, f"reward {first:.3f} -> {last:.3f}"


# --- errors ------------------------------------------------------------------------------------


def test_bad_reward_functions_are_named(tmp_path, monkeypatch, user_modules):
    (tmp_path / "grpo_bad_rewards.py").write_text(
        "def explode(prompts, completions, **kwargs):\n    raise ZeroDivisionError('no answer column')\n"
    )
    monkeypatch.chdir(tmp_path)

    def grpo(*overrides: str) -> None:
        train(compose(["method=grpo", *overrides, *SHORT], tmp_path / f"run{len(list(tmp_path.iterdir()))}"))

    with pytest.raises(AlignError, match=r"reward\.function\.path='nowhere:f': no module named 'nowhere'"):
        grpo("reward=function", "reward.function.path=nowhere:f")
    with pytest.raises(
        AlignError, match=r"module 'grpo_bad_rewards' has no function 'explod'.*mean: explode"
    ):
        grpo("reward=function", "reward.function.path=grpo_bad_rewards:explod")
    # Raised inside training, by TRL's call: the message still names the function and entry.
    with pytest.raises(
        AlignError, match=r"'grpo_bad_rewards:explode' \(reward\.function\) raised ZeroDivisionError"
    ):
        grpo("reward=function", "reward.function.path=grpo_bad_rewards:explode")
    with pytest.raises(AlignError, match=r"method=grpo needs a reward"):
        grpo("reward=none")  # method=grpo alone gets its default_reward
    with pytest.raises(AlignError, match=r"method\.advantage='ranks' is not valid"):
        grpo("reward=length", "method.advantage=ranks")
    with pytest.raises(AlignError, match=r"method\.args\.scale_rewards only shapes the zscore advantage"):
        grpo("reward=length", "method.advantage=rank", "+method.args.scale_rewards=none")
