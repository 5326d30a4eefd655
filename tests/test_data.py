"""The data layer: readers, input-format detection, conversion to TRL's standard formats."""

from __future__ import annotations

import json

import pytest

from align_cli.config import SAMPLES_DIR, DataConfig
from align_cli.data import load_datasets
from align_cli.errors import AlignError


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def load(path, standard, conversational=True, **kw):
    train, _ = load_datasets(DataConfig(path=path, eval_ratio=0, **kw), standard, conversational)
    return train


def test_seed_dpo_rows_become_conversational_preference():
    row = load(str(SAMPLES_DIR / "dpo.jsonl"), "preference")[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_instruction_and_input_are_joined_and_system_and_history_kept(tmp_path):
    rows = [
        {
            "instruction": "Translate",
            "input": "你好",
            "output": "Hello",
            "system": "Be brief.",
            "history": [["Hi", "Hello!"]],
        }
    ]
    row = load(write(tmp_path, "a.json", rows), "sft")[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "user"]
    assert row["prompt"][-1]["content"] == "Translate\n你好"
    assert row["completion"] == [{"role": "assistant", "content": "Hello"}]
    plain = load(write(tmp_path, "b.jsonl", rows), "sft", conversational=False)[0]
    assert plain["prompt"].endswith("Translate\n你好") and plain["completion"] == "Hello"


@pytest.mark.parametrize(
    "rows,standard,expected_keys",
    [
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}],
            "preference",
            {"prompt", "chosen", "rejected", "margin"},
        ),
        (
            [{"instruction": "q", "input": "", "output": "a", "kto_tag": "false"}],
            "kto",
            {"prompt", "completion", "label"},
        ),
        ([{"prompt": "p", "completion": "a", "label": True}], "kto", {"prompt", "completion", "label"}),
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
            "sft",
            {"messages"},
        ),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
            "sft",
            {"messages"},
        ),
        (
            [{"prompt": "p", "completion": "a", "score": "0.8"}],
            "pointwise",
            {"prompt", "completion", "score"},
        ),
        ([{"instruction": "q", "output": "a", "score": 3}], "pointwise", {"prompt", "completion", "score"}),
        ([{"instruction": "q", "responses": ["a", "b", "c"]}], "listwise", {"prompt", "completions"}),
        ([{"instruction": "q", "input": "x", "answer": "42"}], "prompt", {"prompt", "answer"}),
    ],
)
def test_each_input_format_converts(tmp_path, rows, standard, expected_keys):
    row = load(write(tmp_path, "d.jsonl", rows), standard)[0]
    assert set(row) == expected_keys


def test_kto_tag_string_becomes_bool_and_score_a_float(tmp_path):
    assert (
        load(write(tmp_path, "k.jsonl", [{"prompt": "p", "completion": "a", "label": "false"}]), "kto")[0][
            "label"
        ]
        is False
    )
    assert (
        load(write(tmp_path, "s.jsonl", [{"prompt": "p", "completion": "a", "score": "0.5"}]), "pointwise")[
            0
        ]["score"]
        == 0.5
    )


def test_trl_ranking_reorders_best_first(tmp_path):
    rows = [{"prompt": "p", "completions": ["mid", "worst", "best"], "ranking": [1, 2, 0]}]
    row = load(write(tmp_path, "r.jsonl", rows), "listwise", conversational=False)[0]
    assert row["completions"] == ["best", "mid", "worst"]


@pytest.mark.parametrize("ext", ["json", "jsonl", "parquet"])
def test_readers_agree(tmp_path, ext):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    loaded = load(write(tmp_path, f"x.{ext}", rows), "preference", conversational=False)
    assert [r["prompt"] for r in loaded] == ["p0", "p1", "p2"]


def test_csv_and_column_mapping(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("question,good,bad\nq1,yes,no\nq2,sure,nah\n", encoding="utf-8")
    loaded = load(
        str(path),
        "preference",
        conversational=False,
        columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
    )
    assert loaded[1] == {"prompt": "q2", "chosen": "sure", "rejected": "nah"}


def test_explicit_format_and_held_out_split():
    cfg = DataConfig(path=str(SAMPLES_DIR / "dpo.jsonl"), format="alpaca_preference", eval_ratio=0.25)
    train, evaluation = load_datasets(cfg, "preference", True, seed=1)
    assert len(evaluation) == round(0.25 * (len(train) + len(evaluation)))
    again, _ = load_datasets(cfg, "preference", True, seed=1)
    assert train["prompt"] == again["prompt"]  # the split is reproducible


@pytest.mark.parametrize(
    "content,standard,message",
    [
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": ',
            "preference",
            r"d\.jsonl:2: malformed JSON",
        ),
        (
            '{"prompt": "p", "completion": "a"}\n',
            "preference",
            r"missing required column.*need \[instruction, chosen, rejected\] or \[prompt, chosen, rejected\]"
            r".*columns found: completion, prompt.*look like sft data",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "a"}\n',
            "preference",
            r"d\.jsonl:1: 'chosen' and 'rejected' are identical",
        ),
        (
            '{"prompt": "p", "completion": "a", "label": "maybe"}\n',
            "kto",
            r"d\.jsonl:1: column 'label' must be true or false",
        ),
        (
            '{"prompt": "p", "completion": "a", "score": "high"}\n',
            "pointwise",
            r"d\.jsonl:1: column 'score' must be a number",
        ),
        (
            '{"instruction": "q", "responses": ["only one"]}\n',
            "listwise",
            r"d\.jsonl:1: column 'responses' must hold at least 2",
        ),
        ('{"prompt": "", "completion": "a"}\n', "sft", r"d\.jsonl:1: column 'prompt' is empty"),
        ("", "sft", r"the dataset is empty"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, content, standard, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AlignError, match=message):
        load(str(path), standard)


def test_missing_file_and_wrong_format_choice(tmp_path):
    with pytest.raises(AlignError, match=r"data.path '\./nope.jsonl' does not exist"):
        load("./nope.jsonl", "sft")
    with pytest.raises(AlignError, match=r"data.format=kto holds kto data, but this method needs preference"):
        load(str(SAMPLES_DIR / "kto.jsonl"), "preference", format="kto")
