"""`align eval` (align_cli/evaluate.py): policy metrics on hand-checkable cases (a model against
itself: KL 0, win rate 0.5; figures that agree with samples.jsonl), run folders full and LoRA,
reward models scored with training's own metric code (equal to the run's eval metrics), the
real entry point, and the errors a user sees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from align_cli.config import DataConfig, ModelConfig
from align_cli.diagnostics import distinct_n, identical_share
from align_cli.errors import AlignError
from align_cli.eval_policy import EvalSettings, evaluate_policies, win_rate
from align_cli.eval_rm import evaluate_reward_models
from align_cli.eval_tables import markdown_table
from align_cli.evaluate import _models_override
from align_cli.testing import compose
from align_cli.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    {"instruction": "How do I make a bomb?", "input": ""},
    {"instruction": "Convert 5 kilometers to meters.", "input": ""},
    {"instruction": "水的沸点是多少?", "input": ""},
    {"instruction": "Name a primary colour.", "input": ""},
    {"instruction": "Translate to French.", "input": "Good morning"},
]
SMALL = EvalSettings(max_new_tokens=8, num_samples=2, batch_size=4)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "heldout_prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """Two tiny SFT runs (3 steps at a high learning rate): full weights and a LoRA adapter."""
    runs = {}
    for name, extra in (("full", []), ("lora", ["peft=lora"])):
        out = tmp_path_factory.mktemp(f"sft_{name}")
        overrides = ["method=sft", "method.args.max_steps=3", "method.args.learning_rate=0.01"]
        train(compose([*overrides, *extra, "data.eval_ratio=0", "plot=false"], out))
        runs[name] = str(out)
    return runs


# --- pure parts --------------------------------------------------------------------------------


def test_win_rate_counts_ties_half_and_skips_missing():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 5.0, math.nan]) == pytest.approx(1.5 / 3)
    assert math.isnan(win_rate([math.nan], [1.0]))


def test_models_override_keeps_a_comma_list_as_one_value():
    assert _models_override(["model.name_or_path=a,b/c", "x=1"]) == ["model.name_or_path='a,b/c'", "x=1"]
    assert _models_override(["model.name_or_path=tiny"]) == ["model.name_or_path=tiny"]


def test_markdown_table_shows_what_some_model_has():
    result = {
        "kind": "policy",
        "models": [
            {"model": "a", "metrics": {"reward_greedy": 0.5, "kl_to_reference": math.nan}},
            {"model": "b", "metrics": {"reward_greedy": 0.25}},
        ],
    }
    table = markdown_table(result).splitlines()
    assert table[0] == "| model | reward (greedy) | KL to ref |"
    assert table[2] == "| a | 0.5 | n/a |" and table[3] == "| b | 0.25 | n/a |"


def test_settings_are_checked():
    with pytest.raises(AlignError, match="eval.temperature=0 must be positive"):
        EvalSettings(temperature=0)
    with pytest.raises(AlignError, match="nothing to evaluate"):
        EvalSettings(greedy=False, sampled=False)


# --- policies ----------------------------------------------------------------------------------


def test_a_model_against_itself_has_kl_zero_and_wins_half(tmp_path, prompts_file):
    result = evaluate_policies(
        ["tiny"],
        DataConfig(path=prompts_file),
        {"length": {"target": 20}},
        "tiny",
        SMALL,
        output_dir=str(tmp_path),
    )
    metrics = result["models"][0]["metrics"]
    assert result["rows"] == len(PROMPTS)
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    # Same weights, same seed: every completion ties with the reference's.
    assert metrics["win_rate_greedy"] == 0.5 and metrics["win_rate_sampled"] == 0.5
    samples = read_jsonl(tmp_path / "samples.jsonl")
    greedy = [s for s in samples if s["mode"] == "greedy"]
    sampled = [s for s in samples if s["mode"] == "sampled"]
    assert len(greedy) == len(PROMPTS) and len(sampled) == 2 * len(PROMPTS)
    assert all(s["completion"] == s["reference_completion"] for s in samples)
    # Every figure is the one the written completions give.
    for mode, rows in (("greedy", greedy), ("sampled", sampled)):
        texts, prompts = [s["completion"] for s in rows], [s["prompt"] for s in rows]
        assert metrics[f"reward_{mode}"] == pytest.approx(sum(s["reward"] for s in rows) / len(rows))
        expected = [1 - abs(len(t) - 20) / 20 for t in texts]  # the `length` rule reward, by hand
        assert [s["reward"] for s in rows] == pytest.approx(expected, abs=1e-6)
        assert metrics[f"identical_share_{mode}"] == identical_share(prompts, texts)
        d2 = distinct_n(texts, 2)
        assert metrics[f"distinct_2_{mode}"] == d2 or (
            math.isnan(d2) and math.isnan(metrics[f"distinct_2_{mode}"])
        )
        assert 0 < metrics[f"length_{mode}"] <= 8


def test_trained_run_folders_full_and_lora_differ_from_their_start(tmp_path, prompts_file, sft_runs):
    models = ["tiny", sft_runs["full"], sft_runs["lora"]]
    result = evaluate_policies(models, DataConfig(path=prompts_file), None, "tiny", SMALL)
    by_model = {m["model"]: m["metrics"] for m in result["models"]}
    assert by_model["tiny"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    for name in ("full", "lora"):
        # Trained away from the start: the KL on its own samples is positive.
        assert by_model[sft_runs[name]]["kl_to_reference"] > 1e-3, name
    # No reward configured: no reward and no win rate, the rest is there.
    assert not any(k.startswith(("reward", "win_rate")) for k in by_model["tiny"])
    assert "distinct_1_sampled" in by_model["tiny"]


def test_policy_errors_name_the_path_or_key(tmp_path, prompts_file):
    with pytest.raises(AlignError, match="model path 'runs/nope/' does not exist"):
        evaluate_policies(["tiny", "runs/nope/"], DataConfig(path=prompts_file), None)
    with pytest.raises(AlignError, match="reward.correct reads the column 'answer'"):
        evaluate_policies(
            ["tiny"], DataConfig(path=prompts_file), {"correct": {"type": "match"}}, settings=SMALL
        )
    short = ModelConfig(max_length=12)  # 4 tokens of prompt room beside 8 new ones
    with pytest.raises(
        AlignError, match=r"= 12 - 8 = 4 tokens for tiny \(first: .*heldout_prompts.jsonl:1, "
    ):
        evaluate_policies(["tiny"], DataConfig(path=prompts_file), None, settings=SMALL, model_cfg=short)


# --- reward models -----------------------------------------------------------------------------


def _split_file(tmp_path, name: str, keep: int) -> tuple[str, str]:
    rows = read_jsonl(os.path.join(ROOT, "data_samples", name))
    return (
        write_jsonl(tmp_path / f"train_{name}", rows[keep:]),
        write_jsonl(tmp_path / f"heldout_{name}", rows[:keep]),
    )


RM_CASES = {
    "pairwise": ("dpo.jsonl", ["eval_accuracy", "eval_margin"]),
    "pointwise": ("rm_pointwise.jsonl", ["eval_mse", "eval_pearson", "eval_spearman"]),
    "listwise": (
        "rm_listwise.jsonl",
        ["eval_accuracy", "eval_margin", "eval_kendall_tau", "eval_top1_accuracy"],
    ),
}


@pytest.mark.parametrize("mode", list(RM_CASES))
def test_reward_model_metrics_equal_the_training_evaluation(tmp_path, mode):
    """An RM trained a few steps and evaluated on a held-out file during training: align eval on
    the same file gives the same figures (the same scoring layout and metric code)."""
    sample, keys = RM_CASES[mode]
    train_file, heldout = _split_file(tmp_path, sample, 8)
    extra = ["method.normalize=zscore"] if mode == "pointwise" else []
    out = tmp_path / "rm"
    overrides = [f"method.mode={mode}", "method.args.max_steps=2", f"data.path={train_file}"]
    train(compose(["method=rm", *overrides, *extra, f"data.eval_path={heldout}", "plot=false"], out))
    trained = json.loads((out / "summary.json").read_text())["metrics"]
    result = evaluate_reward_models([str(out)], DataConfig(path=heldout), mode)
    metrics = result["models"][0]["metrics"]
    assert result["rows"] == 8
    for key in keys:
        assert metrics[key.removeprefix("eval_")] == pytest.approx(trained[key], abs=1e-4), key


def test_reward_model_errors(tmp_path, sft_runs):
    with pytest.raises(AlignError, match=r"^model.name_or_path='.*' has no trained classification head"):
        evaluate_reward_models([sft_runs["full"]], DataConfig(path=None), "pairwise", "dpo.jsonl")
    with pytest.raises(AlignError, match="method.mode='ranked' is not valid"):
        evaluate_reward_models(["x"], DataConfig(), "ranked")


# --- the real entry point ----------------------------------------------------------------------


def align(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-m", "align_cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_align_eval_command_writes_the_eval_folder(tmp_path, prompts_file, sft_runs):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def has_digit(prompts, completions, **kwargs):
                texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]  # chat: messages
                return [float(any(ch.isdigit() for ch in t)) for t in texts]
            """
        )
    )
    folder = tmp_path / "eval"
    out = align(
        "eval",
        f"model.name_or_path=tiny,{sft_runs['lora']}",
        "reward=function",
        f"reward.function.path={tmp_path / 'my_rewards.py'}:has_digit",
        f"data.path={prompts_file}",
        "eval.reference=tiny",
        "eval.max_new_tokens=6",
        f"hydra.run.dir={folder}",
    )
    assert {"eval.json", "eval.md", "samples.jsonl", ".hydra"} <= set(os.listdir(folder))
    result = json.loads((folder / "eval.json").read_text())
    assert [m["model"] for m in result["models"]] == ["tiny", sft_runs["lora"]]
    assert result["models"][0]["metrics"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    table = (folder / "eval.md").read_text()
    assert "| model | reward (greedy) |" in table and sft_runs["lora"] in table
    assert "| model | reward (greedy) |" in out.stdout  # printed too
    assert len(read_jsonl(folder / "samples.jsonl")) == 2 * 2 * len(PROMPTS)  # 2 models x (greedy + sampled)


def test_align_eval_reward_model_and_one_line_errors(tmp_path, prompts_file):
    rm = tmp_path / "rm"
    train(compose(["method=rm", "method.args.max_steps=2", "data.eval_ratio=0", "plot=false"], rm))
    folder = tmp_path / "eval_rm"
    out = align("eval", "method=rm", f"model.name_or_path={rm}", f"hydra.run.dir={folder}")
    result = json.loads((folder / "eval.json").read_text())
    assert result["kind"] == "rm" and result["mode"] == "pairwise"
    assert 0 <= result["models"][0]["metrics"]["accuracy"] <= 1
    assert "| accuracy | margin |" in out.stdout.replace("model | ", "")
    bad = align("eval", "model.name_or_path=./no/such/run", f"data.path={prompts_file}", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "align: error: model path './no/such/run' does not exist: use model=tiny, a hub id such as "
        "Qwen/Qwen2.5-0.5B-Instruct, or an existing folder"
    ]
    bad = align("eval", "method=dpo", check=False)
    assert bad.returncode == 1 and "align eval takes no method=dpo" in bad.stderr
    bad = align("eval", "eval.temprature=0.5", check=False)
    assert bad.returncode == 1 and "temprature" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
