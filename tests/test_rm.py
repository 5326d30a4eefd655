"""Reward models: each mode learns the samples (held-out metrics), saves a loadable model,
works with LoRA and 4-bit, and reports bad rows by file and line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train

SHORT = ["method.args.max_steps=3", "method.args.per_device_train_batch_size=4", "plot=false"]


def rm_run(tmp_path, mode: str, *overrides: str):
    return train(compose(["method=rm", f"method.mode={mode}", *overrides], tmp_path))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scores_of(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        return model.eval()(**batch).logits.squeeze(-1)


# mode -> (held-out thresholds; chance is 0.5 for pair accuracy, 0 for correlations, ~0.36 for top-1)
LEARNS = {
    "pairwise": {"eval_accuracy": 0.9, "eval_margin": 0.5},
    "pointwise": {"eval_accuracy": 0.8, "eval_pearson": 0.7, "eval_spearman": 0.7},
    "listwise": {"eval_accuracy": 0.8, "eval_kendall_tau": 0.6, "eval_top1_accuracy": 0.6},
}


@pytest.mark.parametrize("mode", sorted(LEARNS))
def test_mode_learns_the_samples_and_saves_a_reward_model(mode, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = rm_run(tmp_path, mode, "data.eval_ratio=0.2", "plot=false")
    metrics = result.metrics
    for key, threshold in LEARNS[mode].items():
        assert metrics[key] >= threshold, (key, metrics)
    assert metrics["loss_last_step"] < 0.5 * metrics["loss_first_step"], metrics
    if mode == "pointwise":
        # Better than predicting the mean score of the held-out rows.
        assert metrics["eval_mse"] < 0.5 * float(np.var(result.trainer.eval_dataset["score"])), metrics
        # Held out by prompt (4 responses each), and pairs compared only within a prompt: the
        # metrics are those of a rescoring with the prompt of each row.
        from align_cli.methods.rm_metrics import pointwise_metrics

        eval_ds = result.trainer.eval_dataset
        assert len(eval_ds) % 4 == 0 and sorted(np.bincount(eval_ds["group"])) == [4] * (len(eval_ds) // 4)
        with torch.no_grad():
            rewards = [
                result.trainer.model(torch.tensor([ids])).logits.item() for ids in eval_ds["input_ids"]
            ]
        expected = pointwise_metrics(rewards, eval_ds["score"], eval_ds["group"])
        for key in ("eval_accuracy", "eval_margin", "eval_pearson"):
            assert metrics[key] == pytest.approx(expected[key.removeprefix("eval_")], abs=1e-5), key

    # Evaluated during training, not only at the end, and summarised.
    evals = [r for r in records(tmp_path) if "eval_accuracy" in r]
    assert len(evals) >= 3 and evals[-1]["eval_accuracy"] >= evals[0]["eval_accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert all(key in summary for key in LEARNS[mode])

    # A one-output sequence classifier with its tokenizer, chat template and pad token id.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template and (tmp_path / "chat_template.jinja").exists()
    texts = ["<|im_start|>user\nhi<|im_end|>\n", "你好,世界!" * 3]
    torch.testing.assert_close(
        scores_of(model, tokenizer, texts), scores_of(result.trainer.model, tokenizer, texts)
    )


@pytest.mark.parametrize("mode", sorted(LEARNS))
def test_qlora_trains_only_adapters_and_the_head(mode, tmp_path):
    import bitsandbytes as bnb

    from align_cli.config import ModelConfig
    from align_cli.modeling import load_model

    result = rm_run(tmp_path, mode, "peft=lora", "peft.r=4", "quant=4bit", *SHORT)
    model = result.trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable), trainable
    head = dict(model.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    original = dict(model.named_parameters())["base_model.model.score.original_module.weight"]
    assert not torch.equal(head, original), "the reward head never trained"
    assert result.trainer.state.global_step == 3

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    # The path PPO / GRPO take (reward.model.path=<run folder>): base + adapter, merged.
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path)), kind="seq_cls")
    assert reloaded.config.num_labels == 1
    torch.testing.assert_close(
        reloaded.score.weight, head.detach().to(reloaded.score.weight.dtype), msg="score head not saved"
    )


def test_lora_adapter_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = rm_run(tmp_path, "pointwise", "peft=lora", "peft.r=4", "method.normalize=zscore", *SHORT)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["A good answer.", "不知道。"]
    torch.testing.assert_close(
        scores_of(reloaded, tokenizer, texts), scores_of(result.trainer.model, tokenizer, texts)
    )
    # The fitted normalisation travels with the run folder.
    norm = json.loads((tmp_path / "score_normalization.json").read_text())
    assert norm["method"] == "zscore" and norm["scale"] > 0


def test_pairwise_margin_column_rows_without_one_mean_zero(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": "A full, helpful answer.", "rejected": "No."}
        | ({"margin": 1.0} if i % 2 else {})
        for i in range(8)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = rm_run(tmp_path / "run", "pairwise", f"data.path={path}", "data.eval_ratio=0", *SHORT)
    assert result.trainer.train_dataset["margin"] == [0.0, 1.0] * 4


def test_pairwise_eval_metrics_are_over_the_whole_split(tmp_path):
    from transformers import AutoModelForSequenceClassification

    # 11 held-out pairs in batches of 3, 3, 3, 2: TRL's mean of per-batch means is not the
    # split's value. 4 of them are flipped, so the accuracy is neither 0 nor 1.
    good, bad = "A clear, complete and helpful answer to the question.", "No."
    train_rows = [{"prompt": f"Question {i}?", "chosen": good, "rejected": bad} for i in range(24)]
    eval_rows = [
        {
            "prompt": f"Other question {i}?",
            "chosen": bad if i % 3 == 0 else good,
            "rejected": good if i % 3 == 0 else bad,
        }
        for i in range(11)
    ]
    train_path = write_rows(tmp_path / "train.jsonl", train_rows)
    eval_path = write_rows(tmp_path / "held.jsonl", eval_rows)
    run = tmp_path / "run"
    result = rm_run(
        run,
        "pairwise",
        f"data.path={train_path}",
        f"data.eval_path={eval_path}",
        "method.args.max_steps=3",
        "method.args.per_device_eval_batch_size=3",
        "plot=false",
    )
    eval_ds = result.trainer.eval_dataset
    assert len(eval_ds) == 11
    model = AutoModelForSequenceClassification.from_pretrained(run).eval()
    with torch.no_grad():
        diffs = np.array(
            [
                model(torch.tensor([row["chosen_ids"]])).logits.item()
                - model(torch.tensor([row["rejected_ids"]])).logits.item()
                for row in eval_ds
            ]
        )
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert summary["eval_accuracy"] == pytest.approx(float((diffs > 0).mean()), abs=1e-9)
    assert 0 < summary["eval_accuracy"] < 1
    assert summary["eval_margin"] == pytest.approx(float(diffs.mean()), abs=1e-5)
    # The evaluations logged during training are over the whole split too: k/11.
    for record in (r for r in records(run) if "eval_accuracy" in r):
        assert round(record["eval_accuracy"] * 11, 6) == round(record["eval_accuracy"] * 11)


def test_undefined_metrics_are_null_in_strict_json_and_na_in_the_summary(tmp_path, capsys):
    # Eval rows with one score and one response per prompt: Pearson is undefined (NaN), and
    # no prompt has two responses to compare, so there is no pair accuracy or margin.
    train_rows = [
        {
            "prompt": f"Question {i}?",
            "completion": "A full answer." if i % 2 else "No.",
            "score": float(i % 2),
        }
        for i in range(16)
    ]
    eval_rows = [{"prompt": f"Other {i}?", "completion": f"Answer {i}.", "score": 0.5} for i in range(4)]
    run = tmp_path / "run"
    rm_run(
        run,
        "pointwise",
        f"data.path={write_rows(tmp_path / 'train.jsonl', train_rows)}",
        f"data.eval_path={write_rows(tmp_path / 'held.jsonl', eval_rows)}",
        *SHORT,
    )

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    summary = strict((run / "summary.json").read_text())["metrics"]
    assert summary["eval_pearson"] is None and summary["eval_spearman"] is None
    assert "eval_accuracy" not in summary and "eval_margin" not in summary
    logged = [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_pearson" in r and r["eval_pearson"] is None for r in logged)
    out = capsys.readouterr().out
    assert re.search(r"eval_pearson +n/a", out) and "nan" not in out.split("finished in")[1]


def write_rows(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_listwise_row_with_one_response_names_file_and_line(tmp_path):
    path = write_rows(
        tmp_path / "ranked.jsonl",
        [
            {"instruction": "Q1", "input": "", "responses": ["good", "bad"]},
            {"instruction": "Q2", "input": "", "responses": ["only one"]},
        ],
    )
    with pytest.raises(AlignError, match=r"ranked\.jsonl:2: .*at least 2 responses"):
        rm_run(tmp_path / "run", "listwise", f"data.path={path}")


def test_non_numeric_score_names_file_and_line(tmp_path):
    path = write_rows(
        tmp_path / "scored.jsonl",
        [
            {"prompt": "Q1", "completion": "A", "score": 0.5},
            {"prompt": "Q2", "completion": "B", "score": 1},
            {"prompt": "Q3", "completion": "C", "score": "high"},
        ],
    )
    with pytest.raises(AlignError, match=r"scored\.jsonl:3: column 'score' must be a number, got 'high'"):
        rm_run(tmp_path / "run", "pointwise", f"data.path={path}")


def test_configuration_mistakes_are_named(tmp_path):
    with pytest.raises(
        AlignError, match=r"method\.mode='listwize' is not valid: use one of pairwise, pointwise, listwise"
    ):
        rm_run(tmp_path / "a", "listwize")
    with pytest.raises(AlignError, match="center_rewards_coefficient"):
        rm_run(tmp_path / "b", "pointwise", "method.args.center_rewards_coefficient=0.01")
    with pytest.raises(AlignError, match=r"method\.normalize='l2'.*zscore"):
        rm_run(tmp_path / "c", "pointwise", "method.normalize=l2")


def test_trl_style_ranking_is_reordered_best_first():
    from align_cli.config import SAMPLES_DIR, DataConfig
    from align_cli.data import load_datasets

    train_ds, _ = load_datasets(
        DataConfig(eval_ratio=0), "listwise", conversational=False, sample="rm_listwise_trl.jsonl"
    )
    raw = json.loads((SAMPLES_DIR / "rm_listwise_trl.jsonl").read_text(encoding="utf-8").splitlines()[0])
    best_first = [c for _, c in sorted(zip(raw["ranking"], raw["completions"], strict=True))]
    assert train_ds[0]["completions"] == best_first


def test_collators_keep_each_prompts_responses_together():
    from align_cli.methods.rm_trainer import ListwiseCollator, PointwiseCollator

    batch = ListwiseCollator(pad_token_id=0)(
        [{"ranked_ids": [[5, 6, 7], [8]]}, {"ranked_ids": [[1], [2, 3], [4]]}]
    )
    assert list(batch)[0] == "group_sizes" and batch["group_sizes"].tolist() == [2, 3]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [1, 0, 0], [2, 3, 0], [4, 0, 0]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 1, 1, 2, 1]
    batch = PointwiseCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2], "score": 0.5}, {"input_ids": [3], "score": 1}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9], [3, 9, 9, 9]] and batch["scores"].tolist() == [
        0.5,
        1.0,
    ]


def test_responses_are_laid_out_as_trl_lays_out_chosen_and_rejected():
    from transformers import AutoTokenizer

    from align_cli.modeling import TINY_TOKENIZER_DIR
    from align_cli.rewards.model import tokenize_response

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    chat = tokenize_response(
        tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}]
    )
    assert tok.decode(chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    plain = tokenize_response(tok, "Hi. ", "Hello")
    assert tok.decode(plain) == "Hi. Hello" + tok.eos_token  # EOS appended, as RewardTrainer does
