"""PPO's pieces alone: the experience maker built directly on the tiny model (no Trainer), checked
against a hand computation, and the critic's own learning rate."""

from __future__ import annotations

import copy

import pytest
import torch

from align_cli.testing import compose
from align_cli.train import train

BETA, GAMMA, LAM, PENALTY = 0.3, 0.9, 0.8, 0.5


def bonus_reward(prompts, completions, bonus, **kwargs):
    """0.1 per character of the completion plus the row's `bonus` column."""
    return [0.1 * len(c) + b for c, b in zip(completions, bonus, strict=True)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One rollout of 4 prompts of different lengths, made by an ExperienceMaker alone."""
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from align_cli.modeling import build_tiny_model
    from align_cli.ppo.config import PPOConfig
    from align_cli.ppo.experience import ExperienceMaker
    from align_cli.ppo.models import prepare_roles

    path = build_tiny_model()
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    args = PPOConfig(
        output_dir=str(tmp_path_factory.mktemp("maker")),
        max_new_tokens=6,
        kl_coef=BETA,
        gamma=GAMMA,
        lam=LAM,
        missing_eos_penalty=PENALTY,
        whiten_advantages=False,
        score_norm="none",
        report_to=[],
    )
    policy, critic, ref = prepare_roles(policy, critic, ref, args)
    texts = ["hello", "the weather today is", "a", "please tell me a story about"]
    data = Dataset.from_dict({"prompt": texts, "bonus": [0.0, 1.0, 2.0, 3.0]})
    maker = ExperienceMaker(policy, critic, ref, tok, [bonus_reward], args, Accelerator(cpu=True))
    prompt_ids = tok(texts)["input_ids"]
    torch.manual_seed(0)
    experience, metrics = maker.make_experience(prompt_ids, [0, 1, 2, 3], data)
    return experience, metrics, maker, prompt_ids, data


def test_the_maker_needs_no_trainer_and_lays_out_the_rollout(made):
    experience, metrics, maker, prompt_ids, _ = made
    b, p = 4, max(len(r) for r in prompt_ids)
    r = experience.response_mask.shape[1]
    assert 1 <= r <= 6 and experience.sequences.shape == (b, p + r) == experience.attention_mask.shape
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert getattr(experience, name).shape == (b, r), name
    assert experience.scores.shape == (b,)
    for i, row in enumerate(prompt_ids):  # prompts left-padded, every prompt token attended
        assert experience.attention_mask[i, :p].tolist() == [0] * (p - len(row)) + [1] * len(row)
        assert experience.sequences[i, p - len(row) : p].tolist() == row
    assert {"score", "kl", "kl_coef", "eos_rate", "entropy", "value_mean"} <= set(metrics)


def test_scores_logprobs_and_values_match_plain_forward_passes(made):
    """Each row run alone (no padding) through plain forwards gives the maker's numbers."""
    experience, _, maker, prompt_ids, data = made
    p = experience.prompt_length
    eos = set(maker.stop_token_ids.tolist())
    for i, row in enumerate(prompt_ids):
        n = int(experience.response_mask[i].sum())
        response = experience.sequences[i, p : p + n].tolist()
        text = maker.tokenizer.decode(response, skip_special_tokens=True)
        ended = any(t in eos for t in response)
        expected = 0.1 * len(text) + data[i]["bonus"] - (0 if ended else PENALTY)
        assert experience.scores[i].item() == pytest.approx(expected, abs=1e-5)
        ids = torch.tensor([row + response])
        with torch.no_grad():
            for model, got in (
                (maker.policy, experience.logprobs),
                (maker.ref_model, experience.ref_logprobs),
            ):
                logp = model(ids).logits[0, len(row) - 1 : -1].float().log_softmax(-1)
                want = logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
                torch.testing.assert_close(got[i, :n], want, atol=1e-4, rtol=1e-4)
            hidden = maker.critic(ids, output_hidden_states=True).hidden_states[-1]
            values = maker.critic.score(hidden[0, len(row) - 1 : -1]).squeeze(-1)
        torch.testing.assert_close(experience.values[i, :n], values, atol=1e-4, rtol=1e-4)


def test_advantages_and_returns_match_a_hand_computation(made):
    """r_t = -beta (log pi - log pi_ref), the score added at the last token; GAE backwards."""
    experience, metrics, _, _, _ = made
    kls = []
    for i in range(len(experience)):
        n = int(experience.response_mask[i].sum())
        logp, ref = experience.logprobs[i].tolist(), experience.ref_logprobs[i].tolist()
        values = experience.values[i].tolist()
        rewards = [-BETA * (logp[t] - ref[t]) for t in range(n)]
        rewards[-1] += experience.scores[i].item()
        kls.append(sum(logp[t] - ref[t] for t in range(n)))
        advantages, following, next_value = [0.0] * n, 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[t] + GAMMA * next_value - values[t]
            following = delta + GAMMA * LAM * following
            advantages[t], next_value = following, values[t]
        returns = [a + v for a, v in zip(advantages, values[:n], strict=True)]
        assert experience.rewards[i, :n].tolist() == pytest.approx(rewards, abs=1e-5)
        assert experience.advantages[i, :n].tolist() == pytest.approx(advantages, abs=1e-5)
        assert experience.returns[i, :n].tolist() == pytest.approx(returns, abs=1e-5)
    assert any(abs(k) > 1e-3 for k in kls)  # the KL term is really in play
    assert metrics["kl"].item() == pytest.approx(sum(kls) / len(kls), abs=1e-5)


def test_critic_learning_rate_zero_freezes_the_critic_not_the_policy(tmp_path, monkeypatch):
    from align_cli.ppo.trainer import PPOTrainer

    start = {}
    original = PPOTrainer.train

    def snapshot_then_train(self, *args, **kwargs):
        start["policy"] = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        start["critic"] = {n: p.detach().clone() for n, p in self.critic.named_parameters()}
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PPOTrainer, "train", snapshot_then_train)
    overrides = [
        "method=ppo", "reward=length", "method.args.max_steps=2", "method.args.per_device_train_batch_size=4",
        "method.args.num_mini_batches=1", "method.args.num_ppo_epochs=1", "method.args.max_new_tokens=8",
        "method.args.critic_learning_rate=0", "plot=false", "data.eval_ratio=0",
    ]  # fmt: skip
    trainer = train(compose(overrides, tmp_path / "run")).trainer
    lrs = [g["initial_lr"] for g in trainer.optimizer.param_groups]  # before the schedule decays them
    assert lrs[0] == 3e-3 and lrs[-1] == 0.0  # the critic's groups follow the policy's, at their own rate
    critic = dict(trainer.critic.named_parameters())
    assert all(torch.equal(critic[n], p) for n, p in start["critic"].items())
    policy = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(policy[n], p) for n, p in start["policy"].items())


def test_old_logprobs_from_generation_match_the_forward_pass(made):
    """old_logprobs=generation: log pi_old and the entropy read off generate's logits equal the
    forward pass's, at a temperature and with top-k truncating the sampling (the scored distribution
    is the untruncated softmax(logits / T)), over chunks of different response widths; and the
    policy runs no forward pass of its own after generation."""
    from align_cli.ppo.config import PPOConfig
    from align_cli.ppo.experience import ExperienceMaker

    _, _, maker, prompt_ids, data = made
    args = PPOConfig(
        output_dir=maker.args.output_dir, max_new_tokens=8, temperature=0.7, top_k=5,
        rollout_forward_batch_size=3, old_logprobs="generation", report_to=[],
    )  # fmt: skip
    from accelerate import Accelerator

    roles = (maker.policy, maker.critic, maker.ref_model, maker.tokenizer)
    gen = ExperienceMaker(*roles, [bonus_reward], args, Accelerator(cpu=True))  # after the config
    # A third of the vocabulary stops a response, so the rows (and the chunks) end at different lengths.
    gen.generation_config.eos_token_id = list(range(0, len(maker.tokenizer), 3))
    gen.stop_token_ids = torch.tensor(gen.generation_config.eos_token_id)
    torch.manual_seed(3)
    sequences, attention_mask, mask, recorded = gen.sample(prompt_ids * 2, record=True)
    width = mask.shape[1]
    lengths = mask.sum(1)
    assert lengths.min() < width and lengths.max() > 1  # padding columns are in play
    assert len({int(lengths[s : s + 3].max()) for s in (0, 3, 6)}) > 1  # chunks of different widths
    forward = gen.forward_passes(sequences, attention_mask, width)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(recorded[key] * mask, forward[key] * mask, atol=1e-5, rtol=1e-5)
    assert (recorded["entropy"] * mask).sum() > 0

    widths = []  # the columns each policy call reads: a prompt, then one token per generate step

    def note(module, args, kwargs, output):
        widths.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1])

    hook = maker.policy.register_forward_hook(note, with_kwargs=True)
    try:
        experience, metrics = gen.make_experience(prompt_ids, [0, 1, 2, 3], data)
    finally:
        hook.remove()
    assert widths and max(widths) <= experience.prompt_length  # no pass over prompt + response
    assert metrics["entropy"] > 0 and torch.isfinite(experience.logprobs).all()


def test_old_logprobs_must_name_a_source():
    from align_cli.ppo.config import PPOConfig

    with pytest.raises(ValueError, match="old_logprobs='cache' must be one of forward, generation"):
        PPOConfig(output_dir="unused", old_logprobs="cache", report_to=[])


def test_step_recorder_reads_the_sampled_token_of_each_step_and_drops_an_undone_step():
    """Step t's token is read at step t + 1 (the last off the output); a step generate ran and
    then undid (transformers' DeferredStopCheck, on MPS: one call more than columns) is cut."""
    from align_cli.ppo.experience import StepRecorder

    torch.manual_seed(0)
    scores = [torch.randn(2, 7) for _ in range(4)]
    tokens = torch.tensor([[1, 4, 0, 6], [5, 5, 2, 3]])
    want = torch.stack(
        [(s / 0.5).log_softmax(-1).gather(1, tokens[:, [t]]).squeeze(1) for t, s in enumerate(scores)], 1
    )
    for calls, width in ((4, 4), (4, 3)):  # as generate returns it; one step more than it returns
        recorder = StepRecorder(temperature=0.5)
        for t in range(calls):
            ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), tokens[:, :t]], dim=1)
            assert recorder(ids, scores[t]) is scores[t]  # the scores pass on unchanged
        out = recorder.finish(tokens[:, :width])
        assert out["logprobs"].shape == out["entropy"].shape == (2, width)
        torch.testing.assert_close(out["logprobs"], want[:, :width])
    assert out["entropy"][0, 0] > 0
