"""PPO (seed 2.3-2.4) end to end on the tiny model: smoke runs with a tiny reward model (full,
LoRA, 4-bit) that save a policy transformers loads, a learning run on a learnable reward, exact
resume from a checkpoint, the critic's starting point, and the errors a user sees."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train

# Two PPO steps of 8 prompts (micro-batch 4, 2 micro-batches per optimiser step, 1 mini-batch).
SHORT = [
    "method.args.max_steps=2",
    "method.args.per_device_train_batch_size=4",
    "method.args.gradient_accumulation_steps=2",
    "method.args.num_mini_batches=1",
    "method.args.num_ppo_epochs=2",
    "method.args.max_new_tokens=12",
    "plot=false",
]
STEP_KEYS = (
    "score", "kl", "non_score_reward", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac",
    "approx_kl", "entropy", "response_length", "kl_coef", "loss",
)  # fmt: skip


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, overrides: list[str], monkeypatch, name: str = "run"):
    """Trains; returns (result, parameters right after loading, per-step records).

    The parameters are a dict: "policy" and "critic" (as loaded, before any LoRA wrapping).
    """
    import align_cli.methods.base as base

    captured = {}
    load = base.MethodContext.load_model

    def load_and_snapshot(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        captured["policy" if kwargs.get("kind", "causal_lm") == "causal_lm" else "critic"] = params(model)
        return model

    monkeypatch.setattr(base.MethodContext, "load_model", load_and_snapshot)
    out = tmp_path / name
    result = train(compose(["method=ppo", *overrides], out))
    return result, captured, [r for r in records(out) if "score" in r]


@pytest.fixture
def share_reward(tmp_path, monkeypatch):
    """A user reward function: 10 x the share of response tokens whose id is a multiple of 8."""
    (tmp_path / "ppo_user_rewards.py").write_text(
        textwrap.dedent(
            """
            def share(prompts, completions, completion_ids, **kwargs):
                return [10 * sum(t % 8 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield ["reward=function", "reward.function.path=ppo_user_rewards:share"]
    sys.modules.pop("ppo_user_rewards", None)


# --- smoke runs -------------------------------------------------------------------------------


def test_full_finetune_with_a_reward_model(tmp_path, monkeypatch, rm_run_folder):
    """Policy and critic train, the reference stays, per-step metrics and the sample table are written."""
    from transformers import AutoModelForCausalLM

    overrides = ["reward=model", f"reward.model.path={rm_run_folder}", "data.eval_ratio=0.1", *SHORT]
    overrides += ["method.args.missing_eos_penalty=3.0"]
    result, loaded, steps = run(tmp_path, overrides, monkeypatch)
    trainer, before = result.trainer, loaded["policy"]
    after = params(trainer.policy)
    moved = [n for n, t in before.items() if not torch.equal(after[n], t)]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors moved"
    # The frozen reference is the starting policy.
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param.float(), before[name]), name
    assert trainer.state.global_step == 2 and [r["step"] for r in steps] == [1, 2]
    for key in (*STEP_KEYS, "rewards/model/mean"):
        assert key in steps[0], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # nothing has moved at the first rollout
    assert 1 <= steps[0]["response_length"] <= 12
    for step in steps:  # the score is the reward model's, minus 3 for each response cut off before EOS
        expected = step["rewards/model/mean"] - 3.0 * (1 - step["eos_rate"])
        assert step["score"] == pytest.approx(expected, abs=1e-4)
    # The critic started from the reward model (method.critic_init=auto), which the rm run trained.
    from transformers import AutoModelForSequenceClassification

    reward_model = params(AutoModelForSequenceClassification.from_pretrained(rm_run_folder))
    assert loaded["critic"].keys() == reward_model.keys()
    assert all(torch.equal(loaded["critic"][n], t) for n, t in reward_model.items())
    assert not torch.equal(
        reward_model["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )

    out = tmp_path / "run"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, after[name])
    # Split at "\n" only: a sampled completion may hold U+2028 and the like, unescaped.
    text = (out / "samples.jsonl").read_text(encoding="utf-8")
    table = [json.loads(line) for line in text.split("\n") if line.strip()]
    assert table and {"step", "prompt", "completion", "score"} <= set(table[0])
    # The schedule evaluated the last step: the run's end does not evaluate it a second time.
    evals = [r for r in records(out) if "eval_score" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert len(table) == 2 * len([r for r in table if r["step"] == 1])
    # eval_score is the mean of the scores in the sample table (missing-EOS penalty included, as in training).
    eval_rows = {r["step"]: r for r in evals}
    assert eval_rows[2]["eval_score"] == pytest.approx(
        sum(r["score"] for r in table if r["step"] == 2) / len([r for r in table if r["step"] == 2]), abs=1e-4
    )
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert {"score", "kl", "eval_score"} <= set(summary)


def test_lora_trains_adapters_only_and_the_reference_is_the_base(tmp_path, monkeypatch, rm_run_folder):
    from peft import AutoPeftModelForCausalLM, PeftModel

    overrides = ["reward=model", f"reward.model.path={rm_run_folder}", "peft=lora", "peft.r=4", *SHORT]
    overrides += ["data.eval_ratio=0"]
    result, loaded, steps = run(tmp_path, overrides, monkeypatch)
    trainer, before = result.trainer, loaded["policy"]
    assert isinstance(trainer.policy, PeftModel) and isinstance(trainer.critic, PeftModel)
    assert trainer.ref_model is None  # the reference is the policy with its adapter off
    base = {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
        for n, p in trainer.policy.named_parameters()
        if "lora_" not in n
    }
    assert all(torch.equal(base[n].float(), t) for n, t in before.items()), "a base weight moved"
    lora_b = [p for n, p in trainer.policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5) and steps[1]["kl"] != 0.0
    out = tmp_path / "run"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any(p.abs().sum() > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)


def test_qlora_policy_and_critic_in_4bit(tmp_path, monkeypatch, share_reward):
    import bitsandbytes as bnb

    overrides = [*share_reward, "peft=lora", "peft.r=4", "quant=4bit", "data.eval_ratio=0", *SHORT]
    result, _, steps = run(tmp_path, overrides, monkeypatch)
    for model in (result.trainer.policy, result.trainer.critic):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert len(steps) == 2 and (tmp_path / "run" / "adapter_model.safetensors").exists()


# --- learning ---------------------------------------------------------------------------------


def test_a_learnable_reward_rises(tmp_path, monkeypatch, share_reward):
    """The random tiny model learns to emit more tokens from a set of 1/8 of the vocabulary.

    The score (10 x their share) starts near 1.25; 16 PPO steps of 16 prompts raise it to about
    2.5 while the adaptive KL coefficient follows the KL (target 20 nats per response).
    """
    overrides = [
        *share_reward,
        "method.args.max_steps=16",
        "method.args.learning_rate=1e-2",
        "method.args.kl_target=20",
        "method.args.kl_horizon=200",
        "data.eval_ratio=0",
        "plot=false",
    ]
    _, _, steps = run(tmp_path, overrides, monkeypatch)
    scores = [r["score"] for r in steps]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.6, f"score {first:.3f} -> {last:.3f}"
    betas = [r["kl_coef"] for r in steps]
    # Adaptive beta: down while the KL is under its target (first steps), then up once above it.
    assert betas[0] == 0.05 and min(betas) < 0.05 < betas[-1], betas


# --- resume -----------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, monkeypatch, share_reward):
    """Weights, critic, optimizer, schedule, RNG, prompt order and KL controller all come back."""
    overrides = [*share_reward, "data.eval_ratio=0", "method.args.save_steps=2", "method.args.kl_target=1"]
    overrides += [o.replace("max_steps=2", "max_steps=3") for o in SHORT]
    whole, _, whole_steps = run(tmp_path, overrides, monkeypatch, "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "critic" / "model.safetensors").exists() and (checkpoint / "ppo_state.json").exists()
    resumed, _, resumed_steps = run(tmp_path, [*overrides, f"resume={checkpoint}"], monkeypatch, "resumed")
    assert resumed.trainer.state.global_step == 3
    assert resumed_steps[-1]["score"] == pytest.approx(whole_steps[-1]["score"])
    assert resumed_steps[-1]["kl_coef"] == pytest.approx(whole_steps[-1]["kl_coef"])
    for name, param in params(whole.trainer.model).items():
        torch.testing.assert_close(params(resumed.trainer.model)[name], param, msg=name)


# --- the critic's start and errors --------------------------------------------------------------


def test_critic_starts_from_the_reward_model_or_the_policy(rm_run_folder):
    from transformers import AutoTokenizer

    from align_cli.methods.ppo import critic_source
    from align_cli.rewards import build_reward_functions

    tokenizer = AutoTokenizer.from_pretrained(rm_run_folder)
    rm, _ = build_reward_functions({"model": str(rm_run_folder)})
    rule, _ = build_reward_functions({"length": 40})
    entry = {"type": "model", "path": str(rm_run_folder)}
    two, _ = build_reward_functions({"a": entry, "b": entry})
    assert critic_source("auto", rm, tokenizer) is rm[0]
    assert critic_source("reward", rm, tokenizer) is rm[0]
    assert critic_source("policy", rm, tokenizer) is None
    assert critic_source("auto", rule, tokenizer) is None
    assert critic_source("b", two, tokenizer) is two[1]
    with pytest.raises(AlignError, match=r"critic_init=reward needs a reward model"):
        critic_source("reward", rule, tokenizer)
    with pytest.raises(AlignError, match=r"holds 2 reward models \(a, b\).*method.critic_init=a"):
        critic_source("auto", two, tokenizer)
    with pytest.raises(AlignError, match=r"critic_init='value' is not valid: use auto, reward or policy"):
        critic_source("value", rm, tokenizer)


def test_configuration_mistakes_are_named(tmp_path):
    def ppo(*overrides: str) -> None:
        train(compose(["method=ppo", *overrides, *SHORT], tmp_path / f"run{len(list(tmp_path.iterdir()))}"))

    with pytest.raises(AlignError, match=r"method\.args\.kl_coeff is not a PPOConfig option.*kl_coef"):
        ppo("method.args.kl_coeff=0.1")
    with pytest.raises(
        AlignError, match=r"PPOConfig rejected the settings: kl_estimator='k2' must be one of k1, k3"
    ):
        ppo("method.args.kl_estimator=k2")
    with pytest.raises(AlignError, match=r"method=ppo needs a reward"):
        ppo("reward=none")
    with pytest.raises(AlignError, match=r"critic_init=reward needs a reward model"):
        ppo("method.critic_init=reward")
    with pytest.raises(AlignError, match=r"method\.critic_head='half' is not valid: use zero .* or keep"):
        ppo("method.critic_head=half", "reward=length")
    with pytest.raises(AlignError, match=r"score_norm='batch' must be one of none, init"):
        ppo("method.args.score_norm=batch")
    with pytest.raises(AlignError, match=r"group_score=zscore compares the responses to one prompt"):
        ppo("method.args.group_score=zscore")
    with pytest.raises(AlignError, match=r"samples_per_prompt=3 must divide the rollout batch"):
        ppo("method.args.samples_per_prompt=3", "method.args.group_score=center")


def test_critic_from_a_reward_model_keeps_its_body_and_zeroes_its_head(rm_run_folder):
    """critic_head=zero: V = 0 at the start, on the reward model's body (its prefix scores are not values)."""
    from transformers import AutoModelForSequenceClassification

    from align_cli.methods.ppo import zero_head

    model = AutoModelForSequenceClassification.from_pretrained(rm_run_folder)
    body = params(model.model)
    assert model.score.weight.abs().sum() > 0  # the trained head
    zero_head(model)
    assert torch.count_nonzero(model.score.weight) == 0
    assert all(torch.equal(params(model.model)[n], t) for n, t in body.items())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.all(model(input_ids=ids).logits == 0)


def test_sampling_ignores_the_checkpoints_own_generation_settings():
    """Sampled tokens come from softmax(logits / T), the distribution PPO scores, even when the
    checkpoint's generation_config asks for a repetition penalty, a minimum length and suppressed
    tokens (which generate would otherwise apply)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align_cli.modeling import build_tiny_model
    from align_cli.ppo.trainer import sampling_only

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model()).eval()
    own = model.generation_config
    own.repetition_penalty, own.min_new_tokens, own.suppress_tokens = 1.8, 6, list(range(3, 40))
    config = GenerationConfig(
        do_sample=True, max_new_tokens=6, temperature=0.7, top_k=0, top_p=1.0,
        output_scores=True, return_dict_in_generate=True, pad_token_id=own.pad_token_id,
    )  # fmt: skip
    prompt = torch.tensor([[5, 17, 23, 5, 17]])

    def max_gap():
        torch.manual_seed(0)
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config
        )
        with torch.no_grad():
            scored = model(out.sequences).logits[0, prompt.shape[1] - 1 : -1].float() / 0.7
        return (torch.stack(out.scores, 1)[0].float() - scored).abs().max().item()

    assert max_gap() > 1.0  # the checkpoint's settings reshape the distribution: the case is real
    with sampling_only(model, config):
        assert max_gap() < 1e-4
    assert model.generation_config is own and own.repetition_penalty == 1.8  # restored


def test_a_prompt_without_room_for_the_response_is_named_before_loading(tmp_path):
    """PPO samples max_new_tokens after the prompt: a longer prompt is an error, never silently cut."""
    cfg = compose(
        ["method=ppo", "model.max_length=40", "method.args.max_new_tokens=30", "reward=length"], tmp_path
    )
    with pytest.raises(AlignError) as err:
        train(cfg)
    message = str(err.value)
    assert "prompts are longer than 10 tokens" in message
    assert (
        "model.max_length=40 less method.args.max_new_tokens=30" in message and "prompts.jsonl:1 " in message
    )


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_token_reward_scores_match_the_reward_models_own_forward(pad_is_eos):
    """reward_model_input=tokens reads the score where the reward model's forward does, also when its
    pad token is the EOS that ends a response (then: the token before it)."""
    from transformers import AutoModelForSequenceClassification

    from align_cli.modeling import build_tiny_model
    from align_cli.ppo.trainer import reward_model_scores

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(build_tiny_model(), num_labels=1).eval()
    eos, pad = 2, (2 if pad_is_eos else 0)
    model.config.pad_token_id = pad
    rows = [[7, 8, 9, 10, 11, eos], [12, 13, 14, eos], [15, 16, 17, 18, 19]]  # the last: cut, no EOS
    prompt_len = [2, 3, 1]
    width = max(len(r) - p for r, p in zip(rows, prompt_len, strict=True))
    left = max(prompt_len)
    seqs, masks, last = [], [], []
    for row, p in zip(rows, prompt_len, strict=True):  # left-padded prompts, right-padded responses
        prompt, response = row[:p], row[p:]
        seqs.append([pad] * (left - p) + prompt + response + [pad] * (width - len(response)))
        masks.append([0] * (left - p) + [1] * len(row) + [0] * (width - len(response)))
        last.append(left + len(response) - 1)
    got = reward_model_scores(model, torch.tensor(seqs), torch.tensor(masks), torch.tensor(last))
    with torch.no_grad():
        expected = torch.cat([model(input_ids=torch.tensor([row])).logits[:, 0] for row in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_reward_functions_log_metrics_and_columns_under_ppo(tmp_path, monkeypatch):
    """TRL's log_metric / log_extra work under our PPO as under GRPO: per-step and eval metrics,
    and extra columns in the sample table."""
    (tmp_path / "ppo_logging_rewards.py").write_text(
        textwrap.dedent(
            """
            def counted(prompts, completions, completion_ids, log_metric, log_extra, **kwargs):
                log_metric("judge/batch", float(len(completions)))
                log_extra("judge_note", [f"n={len(ids)}" for ids in completion_ids])
                return [len(ids) / 10 for ids in completion_ids]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    try:
        overrides = ["reward=function", "reward.function.path=ppo_logging_rewards:counted", *SHORT]
        result, _, steps = run(tmp_path, [*overrides, "data.eval_ratio=0.1"], monkeypatch)
    finally:
        sys.modules.pop("ppo_logging_rewards", None)
    assert [r["judge/batch"] for r in steps] == [8.0, 8.0]  # each step scores its rollout batch of 8 at once
    out = tmp_path / "run"
    assert any("eval_judge/batch" in r for r in records(out))
    table = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert table and all(row["judge_note"].startswith("n=") for row in table)


def test_samples_per_prompt_groups_each_prompt_in_one_rollout(tmp_path, monkeypatch):
    """samples_per_prompt=4: each rollout batch of 8 responses holds 2 prompts, 4 responses each, in
    groups of consecutive rows (what group_score reads); an epoch is a pass over the prompts."""
    (tmp_path / "ppo_group_rewards.py").write_text(
        textwrap.dedent(
            """
            SEEN = []
            def spy(prompts, completions, completion_ids, **kwargs):
                SEEN.append([str(p) for p in prompts])
                return [len(ids) / 10 for ids in completion_ids]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    try:
        overrides = [
            "reward=function",
            "reward.function.path=ppo_group_rewards:spy",
            *SHORT,
            "method.args.samples_per_prompt=4",
            "method.args.group_score=zscore",
        ]
        result, _, steps = run(tmp_path, overrides, monkeypatch)
        seen = sys.modules["ppo_group_rewards"].SEEN
    finally:
        sys.modules.pop("ppo_group_rewards", None)
    train_batches = [batch for batch in seen if len(batch) == 8][: len(steps)]
    assert len(train_batches) == len(steps) == 2
    for batch in train_batches:
        groups = [batch[i : i + 4] for i in range(0, 8, 4)]
        assert all(len(set(g)) == 1 for g in groups)  # one prompt per group
        assert groups[0][0] != groups[1][0]  # two different prompts
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def test_micro_batches_run_longest_rows_first(tmp_path, monkeypatch, share_reward):
    """Within each optimiser step the micro-batches (two of four rows) come longest rows first:
    each then fits in the memory the one before it freed."""
    import align_cli.ppo.update as update

    parts, step = [], update.PPOUpdate.training_step

    def spy(self, model, inputs, num_items_in_batch=None, last=True):
        parts.append((inputs.attention_mask.sum(1).tolist(), last))
        return step(self, model, inputs, num_items_in_batch, last)

    monkeypatch.setattr(update.PPOUpdate, "training_step", spy)
    run(tmp_path, [*share_reward, *SHORT], monkeypatch)
    steps, current = [], []
    for lengths, last in parts:
        current.append(lengths)
        if last:
            steps.append(current)
            current = []
    assert len(steps) == 2 * 2 and not current  # max_steps 2 x num_ppo_epochs 2, one mini-batch each
    for micro in steps:
        assert len(micro) == 2 and all(len(rows) == 4 for rows in micro)
        flat = [n for rows in micro for n in rows]
        assert flat == sorted(flat, reverse=True), micro
    assert any(micro[0][0] > micro[-1][-1] for micro in steps)  # the rows' lengths do differ


def test_old_logprobs_from_generation_train_as_the_forward_pass_does(tmp_path, monkeypatch, share_reward):
    """method.args.old_logprobs=generation drops the policy's pass after generation and changes
    nothing else: the same seed samples the same responses and logs the same steps (log pi_old,
    hence KL, entropy, ratios and losses, to float rounding), and the weights end where they do."""
    common = [*share_reward, *SHORT, "data.eval_ratio=0"]
    results, starts, steps = {}, {}, {}
    for mode in ("forward", "generation"):
        results[mode], starts[mode], steps[mode] = run(
            tmp_path, [*common, f"method.args.old_logprobs={mode}"], monkeypatch, mode
        )
    assert {mode: r.trainer.args.old_logprobs for mode, r in results.items()} == {m: m for m in results}
    assert len(steps["forward"]) == len(steps["generation"]) == 2
    for a, b in zip(steps["forward"], steps["generation"], strict=True):
        assert a["score"] == b["score"] and a["response_length"] == b["response_length"]
        for key in ("kl", "entropy", "approx_kl", "policy_loss", "value_loss", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    # The weights moved the same way (Adam's m / sqrt(v) amplifies rounding where a gradient is ~0,
    # so the whole update is compared, not each weight).
    start = {mode: loaded["policy"] for mode, loaded in starts.items()}
    moved = {}
    for mode, result in results.items():
        end = params(result.trainer.policy)
        moved[mode] = torch.cat([(end[n] - start[mode][n]).flatten() for n in sorted(end)])
    assert moved["forward"].norm() > 0
    assert (moved["generation"] - moved["forward"]).norm() <= 1e-3 * moved["forward"].norm()
