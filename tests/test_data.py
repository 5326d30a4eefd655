"""The data layer: readers, input-format detection, conversion to TRL's standard formats."""

from __future__ import annotations

import json
import random

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


@pytest.mark.parametrize(
    "row,message",
    [
        # Booleans are ints in Python: [true, false] used to pass as the permutation [1, 0].
        (
            {"prompt": "p", "completions": ["a", "b"], "ranking": [True, False]},
            r"r\.jsonl:2: column 'ranking' must be a list of integer ranks \(0 = best\)",
        ),
        (
            {"prompt": "p", "completions": ["a", "b"], "ranking": [0.0, 1.0]},
            r"r\.jsonl:2: column 'ranking' must be a list of integer ranks",
        ),
        (
            {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]},
            r"r\.jsonl:2: column 'ranking' must be a permutation of 0\.\.2",
        ),
        (
            {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 3, 1]},
            r"r\.jsonl:2: .*permutation of 0\.\.2.*got \[2, 3, 1\] \(ranks are 0-based: subtract 1\)",
        ),
        (
            {"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]},
            r"r\.jsonl:2: column 'completions': responses 0 and 2 are identical",
        ),
        (
            {"instruction": "p", "responses": ["same", "other", "same"]},
            r"r\.jsonl:2: column 'responses': responses 0 and 2 are identical",
        ),
    ],
)
def test_bad_rankings_name_the_file_and_line(tmp_path, row, message):
    good = {k: v for k, v in row.items() if k not in ("completions", "responses", "ranking")}
    good[[k for k in row if k in ("completions", "responses")][0]] = ["x", "y"]
    if "ranking" in row:
        good["ranking"] = [1, 0]
    with pytest.raises(AlignError, match=message):
        load(write(tmp_path, "r.jsonl", [good, row]), "listwise", conversational=False)


@pytest.mark.parametrize("column", ["rankings", "rank", "order"])
def test_a_ranking_under_another_name_is_not_read_as_best_first(tmp_path, column):
    rows = [{"prompt": "p", "completions": ["mid", "worst", "best"], column: [1, 2, 0]}]
    path = write(tmp_path, "r.jsonl", rows)
    with pytest.raises(
        AlignError,
        match=rf"r\.jsonl: column '{column}' looks like a ranking.*'completions' are taken as best first.*"
        rf"set data\.columns\.ranking={column}",
    ):
        load(path, "listwise", conversational=False)
    row = load(path, "listwise", conversational=False, columns={"ranking": column})[0]
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
    # Two rows per prompt, held out whole: 26 or 28 of 108 rows for a target of 27.
    assert abs(len(evaluation) - 0.25 * (len(train) + len(evaluation))) <= 1
    again, _ = load_datasets(cfg, "preference", True, seed=1)
    assert train["prompt"] == again["prompt"]  # the split is reproducible


def key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


@pytest.mark.parametrize(
    "sample,standard",
    [("rm_pointwise.jsonl", "pointwise"), ("dpo.jsonl", "preference"), ("kto.jsonl", "kto")],
)
def test_held_out_rows_never_share_a_prompt_with_training(sample, standard):
    # rm_pointwise.jsonl: 216 rows, 4 responses to each of 54 prompts. A row-level split put
    # most eval prompts in training too.
    cfg = DataConfig(path=str(SAMPLES_DIR / sample), eval_ratio=0.2)
    train, evaluation = load_datasets(cfg, standard, True, seed=7)
    train_prompts, eval_prompts = {key(p) for p in train["prompt"]}, {key(p) for p in evaluation["prompt"]}
    assert eval_prompts and not train_prompts & eval_prompts
    total = len(train) + len(evaluation)
    assert abs(len(evaluation) - 0.2 * total) <= 2  # whole prompts: within a group size of the target
    other, _ = load_datasets(cfg, standard, True, seed=8)
    assert {key(p) for p in other["prompt"]} != train_prompts  # the seed picks the prompts


def test_held_out_split_with_one_row_per_prompt_is_the_row_shuffle():
    from align_cli.data.holdout import held_out

    rows = [{"prompt": f"p{i}", "completion": "a"} for i in range(50)]
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert held_out(rows, 0.1, seed=3) == sorted(order[:5])
    assert held_out(rows * 2, 0.1, seed=3) != []  # 2 rows a prompt: 10 rows, 5 prompts
    assert len(held_out(rows * 2, 0.1, seed=3)) == 10
    with pytest.raises(AlignError, match=r"data\.eval_ratio=1\.5 must be in \[0, 1\)"):
        held_out(rows, 1.5, seed=3)


def split_folder(tmp_path, names, rows=None):
    """A folder with one file per name (a name with '/' makes a subfolder), 3 distinct rows each."""
    folder = tmp_path / "splits"
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = path.stem if path.parent == folder else path.parent.name
        data = rows or [{"prompt": f"{tag} {i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n", encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize(
    "names",
    [
        ["train.jsonl", "test.jsonl"],
        ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "test.jsonl"],
        ["train/a.jsonl", "test/b.jsonl"],
    ],
)
def test_eval_split_reads_a_folders_split_files(tmp_path, names):
    folder = split_folder(tmp_path, names)
    train, evaluation = load_datasets(DataConfig(path=folder, eval_split="test"), "preference", False)
    assert all(p.startswith("train") for p in train["prompt"]) and len(train) == 3 * (len(names) - 1)
    assert evaluation["prompt"] == ["test 0", "test 1", "test 2"]


def test_a_folders_training_split_leaves_its_other_splits_out(tmp_path):
    folder = split_folder(tmp_path, ["train.jsonl", "validation.jsonl"])
    train, evaluation = load_datasets(DataConfig(path=folder, eval_ratio=0), "preference", False)
    assert evaluation is None and all(p.startswith("train") for p in train["prompt"])


@pytest.mark.parametrize(
    "names,data,message",
    [
        # The reviewer's case: a single file, where eval_split used to re-read the training rows.
        (
            ["rows.jsonl"],
            {"path": "rows.jsonl", "eval_split": "test"},
            r"data\.eval_split=test: .*rows\.jsonl is a single file, so it has no split 'test'.*data\.eval_path",
        ),
        (
            ["a.jsonl", "b.jsonl"],
            {"eval_split": "test"},
            r"data\.eval_split=test: .*splits has no split 'test'; splits found: none \(its files a\.jsonl, "
            r"b\.jsonl are one dataset",
        ),
        (
            ["train.jsonl", "dev.jsonl"],
            {"eval_split": "test"},
            r"data\.eval_split=test: .*splits has no split 'test'; splits found: dev, train$",
        ),
        (
            ["train.jsonl", "test.jsonl"],
            {"eval_split": "train"},
            r"data\.eval_split=train: evaluation would read .*train\.jsonl, which training reads too",
        ),
        (
            ["rows.jsonl"],
            {"path": "rows.jsonl", "eval_path": "rows.jsonl"},
            r"data\.eval_path=.*rows\.jsonl: evaluation would read .*rows\.jsonl, which training reads too",
        ),
        (
            ["rows.jsonl", "more/train.jsonl", "more/test.jsonl"],
            {"path": "rows.jsonl", "eval_path": "more"},
            r"data\.eval_path=.*more holds the splits test, train: choose one with data\.eval_split=<split>",
        ),
    ],
)
def test_eval_split_that_is_not_there_is_one_line_naming_path_and_splits(tmp_path, names, data, message):
    folder = split_folder(tmp_path, names)
    data = {k: f"{folder}/{v}" if k.endswith("path") else v for k, v in data.items()}
    cfg = DataConfig(**{"path": folder, **data})
    with pytest.raises(AlignError, match=message) as err:
        load_datasets(cfg, "preference", False)
    assert "\n" not in str(err.value)


def test_eval_path_is_a_separate_evaluation_file(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(6)]
    train_path, eval_path = write(tmp_path, "train.jsonl", rows[:4]), write(tmp_path, "held.jsonl", rows[4:])
    train, evaluation = load_datasets(
        DataConfig(path=train_path, eval_path=eval_path, eval_ratio=0.5), "preference", False
    )
    assert train["prompt"] == ["q0", "q1", "q2", "q3"] and evaluation["prompt"] == ["q4", "q5"]


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


# Characters str.splitlines() breaks a line at, besides "\n" and "\r".
SPLITLINES_BREAKS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def test_jsonl_splits_lines_at_newlines_only(tmp_path):
    """Values may hold U+2028 and the like unescaped (json.dumps(ensure_ascii=False) writes them)."""
    rows = [{"prompt": f"a{c}b", "chosen": "yes", "rejected": "no"} for c in SPLITLINES_BREAKS]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)  # Windows line ends too
    path = tmp_path / "u.jsonl"
    path.write_text(text + '{"prompt": "p", "chosen": "", "rejected": "no"}\n', encoding="utf-8", newline="")
    assert any(c in text for c in "\u2028\u2029\x85")  # written raw, not as \u escapes
    with pytest.raises(AlignError, match=rf"u\.jsonl:{len(rows) + 1}: column 'chosen' is empty"):
        load(str(path), "preference", conversational=False)
    path.write_text(text, encoding="utf-8", newline="")
    loaded = load(str(path), "preference", conversational=False)
    assert [r["prompt"] for r in loaded] == [r["prompt"] for r in rows]


def test_csv_values_may_hold_line_separators_and_rows_keep_their_lines(tmp_path):
    path = tmp_path / "c.csv"
    body = "".join(f"p{i},a{c}b,no\r\n" for i, c in enumerate(SPLITLINES_BREAKS))
    quoted = 'q,"two\nlines",no\r\n'  # a quoted value over two lines: the row is named by its first
    path.write_text(f"prompt,chosen,rejected\r\n{body}{quoted}q,,no\r\n", encoding="utf-8", newline="")
    blank_line = len(SPLITLINES_BREAKS) + 4  # header, rows, the two-line row, then the bad row
    with pytest.raises(AlignError, match=rf"c\.csv:{blank_line}: column 'chosen' is empty"):
        load(str(path), "preference", conversational=False)
    path.write_text(f"prompt,chosen,rejected\r\n{body}{quoted}", encoding="utf-8", newline="")
    loaded = load(str(path), "preference", conversational=False)
    assert [r["chosen"] for r in loaded] == [f"a{c}b" for c in SPLITLINES_BREAKS] + ["two\nlines"]


@pytest.mark.parametrize(
    "content,line",
    [
        ('prompt,chosen,rejected\np1,a,b\np2,"a,b\np3,a,b\np4,a,b\n', 3),  # swallows the rest of the file
        ('prompt,chosen,rejected\np1,a,b\np2,a,"b', 3),  # on the last line, without a newline
        ('prompt,"chosen,rejected\np1,a,b\n', 1),  # in the header
        ('prompt,chosen,rejected\np1,"a ""q"" b\nc",b\np2,a,"b\n', 4),  # after a valid multi-line value
        ('prompt,chosen,rejected\np1,a,b\np2,"a,b\n' + "p,x,y\n" * 30000, 3),  # past csv's field limit
    ],
    ids=["rest-of-file", "last-line", "header", "after-multiline", "field-limit"],
)
def test_csv_quote_never_closed_is_named_where_it_opened(tmp_path, content, line):
    path = tmp_path / "q.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AlignError, match=rf'q\.csv:{line}: unterminated quoted field \(a " opened here'):
        load(str(path), "preference", conversational=False)


def test_csv_quotes_that_are_text_or_closed_are_read(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('prompt,chosen,rejected\np1,5" screen,"say ""hi"""\np2,"a"b,c\n', encoding="utf-8")
    loaded = load(str(path), "preference", conversational=False)
    assert [(r["chosen"], r["rejected"]) for r in loaded] == [('5" screen', 'say "hi"'), ("ab", "c")]


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_array_rows_are_named_by_the_line_they_start_on(tmp_path, wrapped):
    rows = [
        {"prompt": 'a "quoted" [{ \\ text', "chosen": "yes", "rejected": "no"},  # escapes and brackets
        {"prompt": "p", "chosen": "", "rejected": "no"},
        7,
        {"prompt": "p", "chosen": "yes", "rejected": "yes"},
    ]
    data = {"meta": {"rows": [1, {"x": [2]}]}, "train": rows, "n": 1} if wrapped else rows
    text = json.dumps(data, indent=2)
    path = tmp_path / "w.json"
    path.write_text(text, encoding="utf-8")
    lines = text.split("\n")
    starts = [i + 1 for i, line in enumerate(lines) if line in ("    {", "  {", "    7,", "  7,")]
    assert len(starts) == 4
    from align_cli.data.convert import read_and_convert
    from align_cli.data.problems import Problems

    problems = Problems()
    read_and_convert(DataConfig(path=str(path)), "preference", False, problems=problems)
    where = sorted((p.split(": ")[0] for p in problems.items), key=lambda w: int(w.rsplit(":", 1)[1]))
    assert where == [f"{path}:{n}" for n in starts[1:]]  # the empty `chosen`, the 7, the identical pair


def test_column_mapping_names_are_checked_on_both_sides(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("question,good,bad,prompt\nq1,yes,no,ignored\n", encoding="utf-8")
    with pytest.raises(
        AlignError,
        match=r"data\.columns\.promt=question: 'promt' is not a column of preference data \(did you mean: "
        r"prompt\?\); data\.columns\.<ours> takes one of chosen, conversations, history, "
        r"human_ref_A, human_ref_B, input, instruction, labels, margin, non_preferred_output, preferred_output, "
        r"prompt, rejected, system, tools$",
    ):
        load(str(path), "preference", columns={"promt": "question"})
    with pytest.raises(
        AlignError,
        match=r"data\.columns\.chosen=goood: .*c\.csv has no column 'goood' \(did you mean: good\?\); "
        r"its columns: bad, good, prompt, question$",
    ):
        load(str(path), "preference", columns={"chosen": "goood"})
    with pytest.raises(AlignError, match=r"data\.columns\.chosen=good and data\.columns\.rejected=good"):
        load(str(path), "preference", columns={"chosen": "good", "rejected": "good"})
    # Messages list the file's own names: the mapped column as `question (as prompt)`.
    with pytest.raises(AlignError, match=r"columns found: bad, good, question \(as prompt\) \(rename"):
        load(str(path), "preference", columns={"prompt": "question"}, format="preference")
    # The mapped column wins over a column of the file that has our name.
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert load(str(path), "preference", conversational=False, columns=mapping)[0]["prompt"] == "q1"
    # Listwise reads `ranking` in both layouts; prompt data passes any column on to reward functions.
    assert "ranking" in __import__("align_cli.data.formats", fromlist=["x"]).known_columns("listwise")
    loaded = load(str(path), "prompt", conversational=False, columns={"answer": "good"})
    assert loaded[0]["answer"] == "yes"
