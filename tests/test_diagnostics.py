"""RL diagnostics (align_cli/diagnostics.py): batch metrics on hand-checkable texts, the collapse
detector on hand-made histories, and on real tiny runs: PPO and GRPO log the metrics, a
deliberately degenerate PPO run (a huge learning rate on a reward for one kind of token) warns,
and `method.stop_on_collapse=true` stops it and keeps the last checkpoint from before the collapse."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from align_cli.diagnostics import (
    GRPO_KEYS,
    CollapseSettings,
    CollapseTracker,
    MetricKeys,
    Probe,
    _checks,
    batch_metrics,
    distinct_n,
    explained_variance,
    find_collapse,
    identical_share,
    shows_signature,
    start_notes,
    text_units,
    top_completion_share,
)
from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train

V = 1000  # log V = 6.91


# --- batch metrics -------------------------------------------------------------------------------


def test_text_units_split_words_and_cjk_characters():
    assert text_units("Hello, world  again") == ["Hello,", "world", "again"]
    assert text_units("水的沸点 is 100度") == ["水", "的", "沸", "点", "is", "100", "度"]
    assert text_units("") == []


def test_distinct_n_counts_distinct_over_all_ngrams():
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)  # a, b of a b a a b
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["x y z"], 2) == 1.0
    assert distinct_n(["same", "same", "same"], 1) == pytest.approx(1 / 3)
    assert math.isnan(distinct_n(["one"], 2))  # no bigram at all


def test_identical_and_top_share_across_prompts():
    prompts = ["p1", "p2", "p3", "p4"]
    assert identical_share(prompts, ["a", "b", "c", "d"]) == 0.0
    assert top_completion_share(prompts, ["a", "b", "c", "d"]) == 0.25
    # "x" answers p1 and p2: those two completions are shared across prompts.
    assert identical_share(prompts, ["x", "x ", "c", "d"]) == 0.5
    assert top_completion_share(prompts, ["x", "x", "c", "d"]) == 0.5
    assert identical_share(prompts, ["same"] * 4) == 1.0
    assert top_completion_share(prompts, ["same"] * 4) == 1.0
    # Two answers reused across prompts (refuse / help) are identical but not one for all.
    assert identical_share(prompts, ["no", "no", "yes", "yes"]) == 1.0
    assert top_completion_share(prompts, ["no", "no", "yes", "yes"]) == 0.5


def test_samples_of_one_prompt_that_agree_are_not_identical_across_prompts():
    # GRPO: K completions per prompt; agreement inside a group is not collapse.
    prompts = ["p1", "p1", "p2", "p2"]
    assert identical_share(prompts, ["a", "a", "b", "b"]) == 0.0
    assert identical_share(prompts, ["a", "a", "a", "b"]) == 0.75
    chat = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    assert batch_metrics(chat, ["same", "same"])["top_completion_share"] == 1.0
    assert math.isnan(identical_share(["p"] * 3, ["a", "a", "a"]))  # one prompt: nothing to compare


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert float(explained_variance(returns.clone(), returns, mask)) == pytest.approx(1.0)
    mean = float((returns * mask).sum() / mask.sum())
    assert float(explained_variance(torch.full_like(returns, mean), returns, mask)) == pytest.approx(0.0)
    # Outside the mask nothing counts: garbage there changes nothing.
    noisy = returns.clone() + (1 - mask) * 100
    assert float(explained_variance(noisy, returns, mask)) == pytest.approx(1.0)
    assert math.isnan(float(explained_variance(returns, torch.ones_like(returns), mask)))


# --- the collapse detector on hand-made histories ------------------------------------------------


def history(**columns) -> list[dict]:
    n = len(next(iter(columns.values())))
    return [{"step": i + 1, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def kinds(found) -> list[str]:
    return [c.kind for c in found]


def test_healthy_history_has_no_collapse():
    h = history(
        score=[0.1, 0.2, 0.4, 0.6],
        entropy=[2.5, 2.3, 2.2, 2.0],
        kl_per_token=[0.0, 0.05, 0.1, 0.2],
        top_completion_share=[0.1, 0.1, 0.2, 0.3],
    )
    assert find_collapse(h, V) == []
    assert not shows_signature(h, V)


def test_entropy_rising_to_uniform_is_found_after_patience_steps():
    h = history(score=[0, 1, 2, 3, 4], entropy=[2.0, 6.5, 2.0, 6.4, 6.6])
    found = find_collapse(h, V)
    assert kinds(found) == ["entropy_uniform"]
    # Step 2 alone is not enough (patience 2): it is confirmed at step 5, begun at step 4.
    assert (found[0].step, found[0].onset) == (5, 4)
    assert "log V = 6.91" in found[0].message
    assert find_collapse(h, V, CollapseSettings(patience=3)) == []


def test_entropy_falling_to_zero_and_one_completion_for_every_prompt():
    h = history(
        score=[0, 1, 2, 3],
        entropy=[1.5, 0.5, 0.01, 0.001],
        top_completion_share=[0.1, 0.5, 0.95, 1.0],
    )
    found = find_collapse(h, V)
    assert sorted(kinds(found)) == ["entropy_zero", "one_completion"]
    assert all(c.step == 4 and c.onset == 3 for c in found)
    assert "100% of the prompts" in next(c for c in found if c.kind == "one_completion").message


def test_kl_running_away():
    h = history(score=[0, 1, 2, 3], kl_per_token=[0.1, 0.9, 1.5, 3.0])
    found = find_collapse(h, V)
    assert kinds(found) == ["kl_runaway"]
    assert found[0].value == 3.0
    assert find_collapse(h, V, CollapseSettings(kl_per_token=5.0)) == []


def test_reward_hacking_needs_a_rising_reward_and_a_high_probe():
    rising = history(score=[0.0, 1.0, 2.0], probe_reward=[2.5, 2.5, 2.5])
    assert kinds(find_collapse(rising, V)) == ["reward_hacking"]
    # The probe scores below what the policy earns: the reward model tells them apart.
    assert find_collapse(history(score=[0.0, 1.0, 2.0], probe_reward=[-3.0] * 3), V) == []
    # A high probe while the reward does not rise: nothing is being exploited (yet).
    assert find_collapse(history(score=[2.0, 1.0, 0.5], probe_reward=[2.5] * 3), V) == []


def test_a_policy_that_starts_degenerate_is_noted_not_collapsing():
    # The untrained tiny model samples near-uniform text from the first step.
    h = history(score=[0, 1, 2], entropy=[6.9, 6.9, 6.85], top_completion_share=[1.0, 1.0, 1.0])
    assert find_collapse(h, V) == []
    notes = start_notes(h[0], V)
    assert len(notes) == 3 and "untrained" in notes[0]
    # A history without the KL key (GRPO with beta=0) cannot show kl_runaway: said, not skipped silently.
    assert "'kl_per_token'" in notes[2] and "kl_runaway signature is not watched" in notes[2]
    assert start_notes({"step": 1, "reward": 0.0, "kl": 0.0}, V, keys=GRPO_KEYS) == []


def test_other_metric_names_and_missing_values():
    # GRPO logs `reward` and a per-token `kl`; a record without a key shows no signature.
    h = history(reward=[0, 1, 2], kl=[0.1, 2.0, 2.0])
    assert kinds(find_collapse(h, V, keys=GRPO_KEYS)) == ["kl_runaway"]
    assert find_collapse(h, V) == []  # with PPO's names nothing is there to check
    h = [{"step": 1, "score": 0.0, "entropy": None}, {"step": 2, "score": 1.0, "entropy": float("nan")}]
    assert find_collapse(h, V) == []
    assert find_collapse([], V) == []
    custom = MetricKeys(reward="r", entropy="e")
    assert kinds(find_collapse(history(r=[0, 1, 2], e=[3.0, 0.0, 0.0]), V, keys=custom)) == ["entropy_zero"]


def test_collapse_settings_from_config():
    assert CollapseSettings.from_config({"kl_per_token": 0.5, "patience": 3}).patience == 3
    with pytest.raises(
        AlignError, match=r"method.collapse.kl_per_tokn is not a collapse setting.*kl_per_token"
    ):
        CollapseSettings.from_config({"kl_per_tokn": 0.5})
    with pytest.raises(AlignError, match="must be a number"):
        CollapseSettings.from_config({"identical": "high"})
    with pytest.raises(AlignError, match="patience=0 must be a whole number"):
        CollapseSettings.from_config({"patience": 0})


def test_probe_scores_degenerate_texts_with_the_reward_model():
    class FakeRM:
        __name__ = "rm"

        def __call__(self, prompts, completions, **kwargs):
            # Scores the completion's length: the long repeated word beats the dot.
            return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    probe = Probe(FakeRM(), ["q1", [{"role": "user", "content": "q2"}]])
    metrics = probe.metrics()
    assert metrics["probe/empty"] == 1.0
    assert metrics["probe/repeat"] == len(" ".join(["the"] * 24))
    assert metrics["probe_reward"] == metrics["probe/repeat"]
    assert probe.reward_key == "rewards/rm/mean"
    assert Probe.for_rewards([lambda **kw: []], ["q"]) is None  # no reward model, no probe


# --- real runs on the tiny model -------------------------------------------------------------


@pytest.fixture
def token_reward(tmp_path, monkeypatch):
    """A reward for one kind of token (ids that are multiples of 8): with a huge learning rate
    the policy runs away from its reference within a few steps."""
    (tmp_path / "degenerate_rewards.py").write_text(
        textwrap.dedent(
            """
            def share(prompts, completions, completion_ids, **kwargs):
                return [10 * sum(t % 8 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "degenerate_rewards:share"


DEGENERATE = [
    "method=ppo",
    "reward=function",
    "method.args.learning_rate=0.1",
    "method.args.max_new_tokens=8",
    "method.args.per_device_train_batch_size=8",
    "method.args.num_mini_batches=1",
    "method.args.num_ppo_epochs=2",
    "data.eval_ratio=0",
    "plot=false",
]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_tracker_finds_what_the_whole_history_shows_one_record_at_a_time():
    """Random histories: the tracker fed record by record confirms each signature at the step a
    scan of the whole history finds it, and tests each record once per signature, not the
    history again at every step (a long run's watch costs the same at step 10 and 10,000)."""
    import random

    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 30)
        h = history(
            score=[rng.uniform(-1, 3) for _ in range(n)],
            entropy=[rng.choice([2.0, 6.8, 0.01, None]) for _ in range(n)],
            kl_per_token=[rng.choice([0.1, 2.0]) for _ in range(n)],
            top_completion_share=[rng.choice([0.2, 0.95]) for _ in range(n)],
            probe_reward=[rng.uniform(-1, 3) for _ in range(n)],
        )
        settings = CollapseSettings(patience=rng.randint(1, 3))
        tracker, confirmed = CollapseTracker(h[0], V, settings), []
        for record in h:
            confirmed += tracker.add(record)
            assert tracker.shows_signature == shows_signature(h[: h.index(record) + 1], V, settings)
        expected = []  # each signature's first run of `patience` records in a row, by brute force
        for kind, test, _ in _checks(h[0], V, settings, MetricKeys()):
            for end in range(settings.patience, n + 1):
                window = h[end - settings.patience : end]
                if all(test(r) is not None for r in window):
                    expected.append((end, kind, window[0]["step"], test(window[-1])))
                    break
        got = [(c.step, c.kind, c.onset, c.value) for c in confirmed]
        assert got == sorted(expected, key=lambda e: e[0]), trial
        assert tracker.found == confirmed == find_collapse(h, V, settings)  # steps rise: the same order

    # Records without a step (all at step 0): ordered by step, ties in the signatures' order.
    h = [{"score": 0.0, "entropy": 1.5, "top_completion_share": 0.1}] + [
        {"score": 1.0, "entropy": 0.01 if i else 1.0, "top_completion_share": 0.95} for i in range(3)
    ]
    assert kinds(find_collapse(h, V)) == ["entropy_zero", "one_completion"]

    calls = 0
    tracker = CollapseTracker({"step": 1, "score": 0.0}, V)

    def counted(test):
        def call(record):
            nonlocal calls
            calls += 1
            return test(record)

        return call

    tracker.checks = [(kind, counted(test), message) for kind, test, message in tracker.checks]
    for step in range(1, 10_001):
        tracker.add({"step": step, "score": 0.0, "entropy": 2.0, "kl_per_token": 0.1})
    assert calls == 10_000 * len(tracker.checks) and tracker.found == []


def test_the_callback_warns_always_and_stops_only_when_asked(capsys):
    from transformers import TrainerControl, TrainerState

    from align_cli.callbacks import CollapseCallback

    logs = [
        {"score": 0.0, "kl_per_token": 0.1},
        {"score": 1.0, "kl_per_token": 2.0},
        {"score": 2.0, "kl_per_token": 3.0},
    ]
    for stop in (False, True):
        watch, state, control = CollapseCallback(V, MetricKeys(), stop=stop), TrainerState(), TrainerControl()
        saves = []
        for step, record in enumerate(logs, 1):
            state.global_step, control.should_save = step, False
            watch.on_log(None, state, control, logs=record)
            saves.append(control.should_save)
        watch.on_log(None, state, control, logs={"eval_score": 5.0})  # evaluation records are not watched
        assert [c.kind for c in watch.found] == ["kl_runaway"] and watch.tracker.records == 3
        assert control.should_training_stop is stop
        assert watch.summary()["collapse"][0]["onset"] == 2
        # With stop_on_collapse: a checkpoint of the healthy step 1 only; without: the schedule decides.
        assert saves == ([True, False, False] if stop else [False, False, False])
    assert capsys.readouterr().err.count("align: warning: collapse at step 3 (since step 2): KL") == 2


def test_degenerate_ppo_run_warns_stops_and_keeps_the_last_good_checkpoint(tmp_path, token_reward, capfd):
    """A huge learning rate on a reward for one kind of token: the KL runs away within a few steps."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = [*DEGENERATE, f"reward.function.path={token_reward}", "method.args.max_steps=10"]
    result = train(compose([*overrides, "method.stop_on_collapse=true", "plot=true"], out))
    err = capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert "align: warning: collapse at step" in err and "KL to the reference" in err
    found = {c["kind"]: c for c in summary["collapse"]}
    assert "kl_runaway" in found and found["kl_runaway"]["value"] > 1.0
    stopped = summary["stopped_on_collapse"]
    assert result.metrics["global_step"] == stopped["step"] < 10
    restored = stopped["restored"]
    assert restored is not None and int(restored.rsplit("-", 1)[1]) < stopped["onset"]
    assert f"stopped at step {stopped['step']} (method.stop_on_collapse)" in err
    assert restored in err
    # The run's model is the restored checkpoint's policy, not the collapsed one.
    root, good = load_file(out / "model.safetensors"), load_file(f"{restored}/model.safetensors")
    assert root.keys() == good.keys() and all(torch.equal(root[k], good[k]) for k in root)
    # No checkpoint of a step that showed the signature.
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and max(saved) < stopped["onset"]
    steps = [r for r in records(out) if "score" in r]
    for key in (
        "entropy", "kl_per_token", "policy_clipfrac", "value_explained_variance", "response_length",
        "distinct_1", "distinct_2", "identical_share", "top_completion_share",
    ):  # fmt: skip
        assert all(key in r for r in steps), key
    # The KL per token is the logged per-response KL spread over the response's tokens.
    assert steps[-1]["kl_per_token"] == pytest.approx(
        steps[-1]["kl"] / steps[-1]["response_length"], rel=1e-4
    )
    assert (out / "diagnostics.svg").read_text().count("<polyline") >= 6


def test_grpo_logs_the_diagnostics_and_stops_on_collapse(tmp_path):
    """GRPO through TRL: the batch metrics arrive through log_metric, and a stop on collapse (here
    a KL threshold no step after the first can stay under) restores the step-1 checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = ["method=grpo", "method.args.max_steps=6", "method.args.beta=0.1", "data.eval_ratio=0"]
    collapse = ["method.collapse.kl_per_token=1e-9", "method.stop_on_collapse=true", "plot=false"]
    result = train(compose([*overrides, *collapse], out))
    steps = [r for r in records(out) if "reward" in r]
    for key in ("distinct_1", "distinct_2", "identical_share", "top_completion_share", "entropy", "kl"):
        assert all(key in r for r in steps), key
    assert 0 < steps[0]["distinct_1"] <= 1 and steps[0]["kl"] == 0.0
    stopped = json.loads((out / "summary.json").read_text())["stopped_on_collapse"]
    assert (stopped["kind"], stopped["onset"], stopped["step"]) == ("kl_runaway", 2, 3)
    assert result.metrics["global_step"] == 3
    assert stopped["restored"] == str(out / "checkpoint-1")
    root, good = load_file(out / "model.safetensors"), load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(root[k], good[k]) for k in root)


def test_ppo_with_a_reward_model_logs_its_score_of_the_degenerate_probe(tmp_path):
    from align_cli.rewards.model import ModelReward

    rm = tmp_path / "rm"
    train(compose(["method=rm", "method.args.max_steps=2", "data.eval_ratio=0", "plot=false"], rm))
    out = tmp_path / "ppo"
    overrides = ["method=ppo", "reward=model", f"reward.model.path={rm}", "method.args.max_steps=2"]
    train(compose([*overrides, "method.args.max_new_tokens=8", "data.eval_ratio=0", "plot=false"], out))
    steps = [r for r in records(out) if "score" in r]
    # The reward model's own score of the probe texts for the first 4 training prompts.
    from align_cli.config import SAMPLES_DIR, DataConfig
    from align_cli.data import load_datasets

    prompts = load_datasets(
        DataConfig(path=str(SAMPLES_DIR / "prompts.jsonl"), eval_ratio=0), "prompt", True
    )[0]
    expected = Probe(ModelReward("model", path=str(rm)), prompts["prompt"][:4]).metrics()
    for record in steps:
        for key in ("probe/repeat", "probe/empty", "probe_reward"):
            assert record[key] == pytest.approx(expected[key], abs=1e-5), key
    assert expected["probe_reward"] == max(expected["probe/repeat"], expected["probe/empty"])


def test_bad_collapse_settings_fail_before_anything_loads(tmp_path):
    from align_cli.compose import compose_checked

    # Types: refused when the config is composed (RolloutSettings types method.collapse).
    with pytest.raises(AlignError, match=r"method.collapse.patience=soon: Value 'soon' .* Integer"):
        compose_checked(["method=ppo", "method.collapse.patience=soon"])
    with pytest.raises(AlignError, match=r"method.stop_on_collapse=maybe: .*use true or false"):
        compose_checked(["method=grpo", "method.stop_on_collapse=maybe"])
    # Values: CollapseSettings' own check, before training reads anything.
    with pytest.raises(AlignError, match=r"method.collapse.patience=0 must be a whole number, at least 1"):
        train(compose(["method=ppo", "method.collapse.patience=0"], tmp_path / "a"))
    assert not (tmp_path / "a").exists()
