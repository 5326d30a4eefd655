"""Community data layouts: each converts to the rows the trainer gets, or is refused with the way on.

Every fixture here is written for this file (rows in the published shapes of each layout, with
our own content). Each test asserts the converted rows' content, not only that loading works.
"""

from __future__ import annotations

import json
import logging

import pytest

from align_cli.config import CONF_DIR, DataConfig
from align_cli.data import load_datasets, read_splits
from align_cli.errors import AlignError


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def load(path, standard, conversational=True, **kw):
    train, _ = load_datasets(DataConfig(path=path, eval_ratio=0, **kw), standard, conversational)
    return train.to_list()


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------
# Preference: the prompt inside the answers


def test_h4_layout_strips_the_user_turn_the_answers_repeat(tmp_path, caplog):
    rows = [
        {
            "prompt": "Name a prime number.",
            "prompt_id": "a1",
            "chosen": [user("Name a prime number."), bot("Seven.")],
            "rejected": [user("Name a prime number."), bot("Nine.")],
            "messages": [user("Name a prime number."), bot("Seven.")],
            "score_chosen": 8.5,
            "score_rejected": 2.0,
        }
    ]
    with caplog.at_level(logging.WARNING, logger="align"):
        row = load(write(tmp_path, "h4.jsonl", rows), "preference")[0]
    assert row["prompt"] == [user("Name a prime number.")]
    assert row["chosen"] == [bot("Seven.")] and row["rejected"] == [bot("Nine.")]
    # The columns nothing reads are named, not dropped in silence.
    for col in ("prompt_id", "messages", "score_chosen", "score_rejected"):
        assert f"column '{col}' is not read" in caplog.text
    plain = load(write(tmp_path, "h4b.jsonl", rows), "preference", conversational=False)[0]
    assert plain == {"prompt": "Name a prime number.", "chosen": "Seven.", "rejected": "Nine."}


def test_h4_layout_whose_turns_are_not_the_prompt_is_refused(tmp_path):
    rows = [{"prompt": "Q one", "chosen": [user("Q two"), bot("a")], "rejected": [user("Q two"), bot("b")]}]
    with pytest.raises(
        AlignError, match=r"h4\.jsonl:1: .*repeat leading turns that are not the 'prompt' column"
    ):
        load(write(tmp_path, "h4.jsonl", rows), "preference")


def test_implicit_prompt_conversational_standard_and_hh(tmp_path):
    rows = [
        {
            "chosen": [user("Hi"), bot("Hello!"), user("Sum 2+2"), bot("4")],
            "rejected": [user("Hi"), bot("Hello!"), user("Sum 2+2"), bot("5")],
        },
        {
            "chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
            "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon, I think.",
        },
    ]
    first, hh = load(write(tmp_path, "imp.jsonl", rows), "preference")
    assert first["prompt"] == [user("Hi"), bot("Hello!"), user("Sum 2+2")]
    assert first["chosen"] == [bot("4")] and first["rejected"] == [bot("5")]
    assert hh["prompt"] == [user("Capital of France?")]
    assert hh["chosen"] == [bot("Paris.")] and hh["rejected"] == [bot("Lyon, I think.")]
    text = load(
        write(tmp_path, "s.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]),
        "preference",
        False,
    )
    assert text == [{"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}]


def test_implicit_prompt_without_shared_text_is_refused(tmp_path):
    with pytest.raises(
        AlignError, match=r"n\.jsonl:1: 'chosen' and 'rejected' share no leading text.*add a 'prompt' column"
    ):
        load(write(tmp_path, "n.jsonl", [{"chosen": "Yes.", "rejected": "No."}]), "preference", False)


def test_trl_lib_ultrafeedback_layout_and_the_shipped_config(tmp_path):
    """trl-lib/ultrafeedback_binarized has no prompt column: chosen/rejected hold the user turn."""
    rows = [
        {
            "chosen": [user("Write a haiku about rain."), bot("Soft rain on the roof")],
            "rejected": [user("Write a haiku about rain."), bot("Rain is water.")],
            "score_chosen": 9.0,
            "score_rejected": 4.0,
        }
    ]
    from omegaconf import OmegaConf

    shipped = OmegaConf.load(CONF_DIR / "data" / "ultrafeedback.yaml")
    assert shipped.path == "trl-lib/ultrafeedback_binarized"
    row = load(write(tmp_path, "uf.jsonl", rows), "preference", format=shipped.format)[0]
    assert row["prompt"] == [user("Write a haiku about rain.")]
    assert row["chosen"] == [bot("Soft rain on the roof")]


def test_llamafactory_sharegpt_preference(tmp_path):
    rows = [
        {
            "conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2*3?"}],
            "chosen": {"from": "gpt", "value": "6"},
            "rejected": {"from": "gpt", "value": "It is 5"},
        }
    ]
    row = load(write(tmp_path, "lf.json", rows), "preference")[0]
    assert row["prompt"] == [{"role": "system", "content": "Be terse."}, user("2*3?")]
    assert row["chosen"] == [bot("6")] and row["rejected"] == [bot("It is 5")]


def test_openai_preference_file(tmp_path):
    rows = [
        {
            "input": {"messages": [user("Greet me in French.")]},
            "preferred_output": [bot("Bonjour !")],
            "non_preferred_output": [bot("Hello!")],
        }
    ]
    row = load(write(tmp_path, "oa.jsonl", rows), "preference")[0]
    assert row == {
        "prompt": [user("Greet me in French.")],
        "chosen": [bot("Bonjour !")],
        "rejected": [bot("Hello!")],
    }


@pytest.mark.parametrize("label,winner", [(1, "Use a rope."), (0, "Jump.")])
def test_shp_labels_say_which_side_won(tmp_path, label, winner):
    rows = [
        {
            "history": "How do I get down a cliff?",
            "human_ref_A": "Use a rope.",
            "human_ref_B": "Jump.",
            "labels": label,
            "score_A": 10,
        }
    ]
    row = load(write(tmp_path, "shp.jsonl", rows), "preference", False)[0]
    loser = {"Use a rope.", "Jump."} - {winner}
    assert row == {"prompt": "How do I get down a cliff?", "chosen": winner, "rejected": loser.pop()}


def test_system_column_reaches_the_prompt_of_trl_layouts(tmp_path):
    rows = [
        {
            "system": "Answer in one word.",
            "prompt": "Sky colour?",
            "chosen": "Blue",
            "rejected": "It varies a lot",
        }
    ]
    row = load(write(tmp_path, "sys.jsonl", rows), "preference")[0]
    assert row["prompt"] == [{"role": "system", "content": "Answer in one word."}, user("Sky colour?")]
    plain = load(write(tmp_path, "sys2.jsonl", rows), "preference", False)[0]
    assert plain["prompt"] == "Answer in one word.\nSky colour?"


# --------------------------------------------------------------------------------------
# Listwise and stepwise


def test_listwise_scores_rank_the_completions_best_first(tmp_path):
    rows = [{"prompt": "p", "completions": ["ok", "best", "worst"], "scores": [5, 9.5, 1]}]
    assert load(write(tmp_path, "s.jsonl", rows), "listwise", False)[0]["completions"] == [
        "best",
        "ok",
        "worst",
    ]
    rated = [{"prompt": "p", "completions": ["ok", "best", "worst"], "ratings": [3, 4, 1]}]
    assert load(write(tmp_path, "r.jsonl", rated), "listwise", False)[0]["completions"] == [
        "best",
        "ok",
        "worst",
    ]
    named = [{"prompt": "p", "completions": ["ok", "best"], "quality": [0.2, 0.7]}]
    row = load(write(tmp_path, "q.jsonl", named), "listwise", False, columns={"scores": "quality"})[0]
    assert row["completions"] == ["best", "ok"]


def test_listwise_score_ties_are_refused_with_the_way_on(tmp_path):
    rows = [
        {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]},
        {"prompt": "q", "completions": ["a", "b", "c"], "scores": [3, 1, 3]},
    ]
    with pytest.raises(
        AlignError, match=r"t\.jsonl:2: column 'scores': responses 0 and 2 tie at 3.*method\.mode=pointwise"
    ):
        load(write(tmp_path, "t.jsonl", rows), "listwise", False)


def test_scored_completions_train_pointwise_one_row_per_response(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "scores": [1, 3]}]
    assert load(write(tmp_path, "pw.jsonl", rows), "pointwise", False) == [
        {"prompt": "p", "completion": "a", "score": 1.0},
        {"prompt": "p", "completion": "b", "score": 3.0},
    ]


def test_stepwise_supervision_is_not_taken_for_a_ranking(tmp_path):
    rows = [{"prompt": "3*4+1?", "completions": ["3*4 = 12", "12+1 = 14"], "labels": [True, False]}]
    with pytest.raises(AlignError, match=r"step\.jsonl: column 'labels' .*stepwise supervision"):
        load(write(tmp_path, "step.jsonl", rows), "listwise", False)


def test_a_meaningful_column_nothing_reads_is_an_error(tmp_path, caplog):
    rows = [{"prompt": "p", "completion": "a", "label": True, "scores": [1, 2]}]
    with pytest.raises(
        AlignError, match=r"m\.jsonl: column 'scores' \(a score per response\) is not read by the kto layout"
    ):
        load(write(tmp_path, "m.jsonl", rows), "kto")
    harmless = [{"prompt": "p", "completion": "a", "label": True, "id": 7}]
    with caplog.at_level(logging.WARNING, logger="align"):
        assert load(write(tmp_path, "h.jsonl", harmless), "kto")[0]["label"] is True
    assert "column 'id' is not read by the kto layout" in caplog.text


# --------------------------------------------------------------------------------------
# SFT: weights, parts, plain text, tool calls


def test_openai_weight_zero_turns_are_not_trained(tmp_path):
    msgs = [
        {"role": "system", "content": "You are a tutor."},
        user("What is 3+3?"),
        {"role": "assistant", "content": "Seven.", "weight": 0},
        user("Really?"),
        {"role": "assistant", "content": "Sorry, six.", "weight": 1},
    ]
    rows = load(
        write(tmp_path, "w.jsonl", [{"messages": msgs}, {"messages": [user("Hi"), bot("Hello")]}]), "sft"
    )
    # One prompt/completion row per trained turn: "Seven." is context only, never a completion.
    assert rows[0]["completion"] == [bot("Sorry, six.")]
    assert rows[0]["prompt"][2] == bot("Seven.") and len(rows[0]["prompt"]) == 4
    assert rows[1] == {"prompt": [user("Hi")], "completion": [bot("Hello")]}
    assert all("weight" not in m for r in rows for m in [*r["prompt"], *r["completion"]])
    assert not any(r["completion"] == [bot("Seven.")] for r in rows)


def test_all_weights_zero_is_refused(tmp_path):
    rows = [{"messages": [user("q"), {"role": "assistant", "content": "a", "weight": 0}]}]
    with pytest.raises(AlignError, match=r"w\.jsonl:1: .*every assistant message has weight 0"):
        load(write(tmp_path, "w.jsonl", rows), "sft")


def test_content_parts_become_text_and_other_parts_are_refused(tmp_path):
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}],
                },
                bot("ok"),
            ]
        }
    ]
    assert load(write(tmp_path, "p.jsonl", rows), "sft")[0]["messages"][0] == user("Line one\nline two")
    image = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                bot("ok"),
            ]
        }
    ]
    with pytest.raises(
        AlignError, match=r"i\.jsonl:1: column 'messages' message 0 content part 0 is of type 'image_url'"
    ):
        load(write(tmp_path, "i.jsonl", image), "sft")


def test_plain_text_column_and_txt_file(tmp_path):
    assert load(write(tmp_path, "t.jsonl", [{"text": "Once upon a time."}]), "sft", False) == [
        {"text": "Once upon a time."}
    ]
    path = tmp_path / "book.txt"
    path.write_text("First line.\n\nSecond line.\n", encoding="utf-8")
    train, _ = read_splits(DataConfig(path=str(path), eval_ratio=0), "sft", False).loaded()
    assert train.rows == [{"text": "First line."}, {"text": "Second line."}]
    assert train.origins == [f"{path}:1", f"{path}:3"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_openai_tool_calls_and_tools_column(tmp_path):
    msgs = [
        user("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        bot("It is -3 C in Oslo."),
    ]
    row = load(write(tmp_path, "tc.jsonl", [{"messages": msgs, "tools": [WEATHER_TOOL]}]), "sft")[0]
    call = row["messages"][1]
    assert call["content"] == "" and call["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    assert row["messages"][2]["role"] == "tool" and row["messages"][2]["tool_call_id"] == "c1"
    assert json.loads(row["tools"]) == [WEATHER_TOOL]


def test_sharegpt_tool_use(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
                },
                {"from": "observation", "value": "-3 C"},
                {"from": "gpt", "value": "It is -3 C."},
            ],
            "tools": json.dumps([WEATHER_TOOL["function"]]),  # LLaMA-Factory's bare function schemas
        }
    ]
    row = load(write(tmp_path, "sg.json", rows), "sft")[0]
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert json.loads(row["tools"]) == [WEATHER_TOOL]


def test_a_template_that_ignores_tools_is_refused(tmp_path):
    from align_cli import modeling
    from align_cli.config import ModelConfig

    tokenizer = modeling.load_tokenizer(ModelConfig())
    msgs = [
        user("Weather?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}],
        },
        {"role": "tool", "content": "sunny"},
        bot("Sunny."),
    ]
    path = write(tmp_path, "tc.jsonl", [{"messages": msgs}])
    with pytest.raises(
        AlignError,
        match=r"tc\.jsonl:1: the chat template does not render tool calls \('get_weather' leaves the text unchanged.*model\.chat_template",
    ):
        read_splits(DataConfig(path=path, eval_ratio=0), "sft", True, tokenizer=tokenizer).loaded()


def test_sharegpt_errors_name_the_column_and_the_wrong_from_value(tmp_path):
    rows = [{"conversations": [{"from": "person", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    with pytest.raises(
        AlignError, match=r"g\.json:\d+: column 'conversations' turn 0 has from='person'; valid: .*human"
    ):
        load(write(tmp_path, "g.json", rows), "sft")


def test_kto_messages_and_label(tmp_path):
    rows = [
        {"messages": [user("Best pet?"), bot("A cat.")], "label": True},
        {"messages": [user("Best pet?"), bot("A rock.")], "label": False},
    ]
    good, bad = load(write(tmp_path, "k.json", rows), "kto")
    assert good == {"prompt": [user("Best pet?")], "completion": [bot("A cat.")], "label": True}
    assert bad["label"] is False and bad["completion"] == [bot("A rock.")]


# --------------------------------------------------------------------------------------
# Hints that point the right way


def test_preference_conversations_are_not_read_as_sft(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        }
    ]
    with pytest.raises(
        AlignError,
        match=r"look like preference data \(sharegpt_preference.*method=dpo.*chosen, rejected would not be used",
    ):
        load(write(tmp_path, "p.json", rows), "sft")


# --------------------------------------------------------------------------------------
# Several files, a LLaMA-Factory registry


def test_several_files_with_row_counts_and_shares(tmp_path):
    a = write(tmp_path, "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(4)])
    b = write(tmp_path, "b.json", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)])
    rows = load([a, {"path": b, "share": 0.5}], "sft", False)
    assert [r["prompt"] for r in rows] == ["a0", "a1", "a2", "a3", "b0", "b1"]
    rows = load([{"path": a, "rows": 1}, b], "sft", False)
    assert [r["prompt"] for r in rows] == ["a0", "b0", "b1", "b2", "b3"]
    with pytest.raises(AlignError, match=r"data\.path\[1\]\.share=2 must be a fraction in \(0, 1\]"):
        load([a, {"path": b, "share": 2}], "sft", False)


def test_a_list_of_paths_composes_from_the_command_line(tmp_path):
    from align_cli.testing import compose
    from align_cli.train import checked_config

    a = write(tmp_path, "a.jsonl", [{"instruction": "q", "output": "x"}])
    cfg = compose(["method=sft", f"data.path=[{a},{{path:{a},rows:1}}]"], tmp_path)
    _, _, data_cfg = checked_config(cfg)
    rows = load(data_cfg.path, "sft", False)
    assert len(rows) == 2 and rows[0] == rows[1]


def test_llamafactory_dataset_info_registry(tmp_path):
    write(
        tmp_path,
        "kto_demo.json",
        [
            {
                "msgs": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                "good": True,
            }
        ],
    )
    write(tmp_path, "pairs.json", [{"q": "2+2?", "win": "4", "lose": "5"}])
    registry = {
        "my_kto": {
            "file_name": "kto_demo.json",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs", "kto_tag": "good"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        },
        "my_pairs": {
            "file_name": "pairs.json",
            "ranking": True,
            "columns": {"prompt": "q", "chosen": "win", "rejected": "lose"},
        },
    }
    write(
        tmp_path,
        "lf_dpo.json",
        [
            {
                "turns": [{"from": "human", "value": "2+2?"}],
                "chosen": {"from": "gpt", "value": "4"},
                "rejected": {"from": "gpt", "value": "5"},
            }
        ],
    )
    registry["lf_dpo"] = {
        "file_name": "lf_dpo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "turns"},
    }
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps(registry), encoding="utf-8")
    kto = load(str(info), "kto", dataset="my_kto")[0]
    assert kto == {"prompt": [user("Hi")], "completion": [bot("Hello")], "label": True}
    pair = load(str(info), "preference", False, dataset="my_pairs")[0]
    assert pair == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    lf = load(str(info), "preference", dataset="lf_dpo")[0]
    assert lf == {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}
    with pytest.raises(AlignError, match=r"data\.dataset=my_pair is not in .*did you mean: my_pairs"):
        load(str(info), "preference", dataset="my_pair")


# --------------------------------------------------------------------------------------
# Prompts too long


def test_too_long_refuses_by_default_drops_or_truncates_when_asked(tmp_path, caplog):
    from align_cli import modeling
    from align_cli.config import ModelConfig
    from align_cli.data import PromptRoom

    tokenizer = modeling.load_tokenizer(ModelConfig())
    long_text = "word " * 80
    rows = [
        {"instruction": "Short one.", "output": "a"},
        {"instruction": "Summarise: " + long_text, "output": "b"},
    ]
    path = write(tmp_path, "l.jsonl", rows)
    room = PromptRoom(30, "test room")
    with pytest.raises(
        AlignError, match=r"1 of 2 prompts are longer than 30 tokens .*l\.jsonl:2.*data\.too_long=drop"
    ):
        read_splits(DataConfig(path=path, eval_ratio=0), "sft", True, tokenizer=tokenizer, room=room).loaded()
    with caplog.at_level(logging.WARNING, logger="align"):
        dropped, _ = read_splits(
            DataConfig(path=path, eval_ratio=0, too_long="drop"), "sft", True, tokenizer=tokenizer, room=room
        ).loaded()
    assert [r["completion"][0]["content"] for r in dropped.rows] == ["a"] and dropped.origins == [f"{path}:1"]
    assert "left out 1 of 2 rows" in caplog.text
    cut, _ = read_splits(
        DataConfig(path=path, eval_ratio=0, too_long="truncate"), "sft", True, tokenizer=tokenizer, room=room
    ).loaded()
    from align_cli.data.lengths import measure

    assert len(cut.rows) == 2 and measure(cut.rows, "sft", tokenizer, prompts_only=True).prompt[1] <= 30
    assert cut.rows[1]["prompt"][-1]["content"].startswith("Summarise: word")


# --------------------------------------------------------------------------------------
# align data preview, and a few real training starts


def test_preview_prints_the_trainer_rows_as_json_lines(tmp_path, capsys):
    from align_cli.cli import main

    rows = [{"chosen": [user("Q?"), bot("good")], "rejected": [user("Q?"), bot("bad")]} for _ in range(2)]
    rows[1] = {"prompt": "Other?", "chosen": "yes", "rejected": "no"}
    path = write(
        tmp_path,
        "pv.jsonl",
        rows[:1] + [{"chosen": [user("Z?"), bot("z")], "rejected": [user("Z?"), bot("y")]}],
    )
    main(
        ["data", "preview", "method=dpo", f"data.path={path}", "data.eval_ratio=0", "rows=1", "rendered=true"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = json.loads(out[0])
    assert line["source"] == f"{path}:1"
    assert line["prompt"] == [user("Q?")] and line["chosen"] == [bot("good")]
    assert line["rendered"]["chosen"].startswith("<|im_start|>user\nQ?") and line["trained"][
        "chosen"
    ].startswith("good")


@pytest.mark.parametrize(
    "method,rows",
    [
        (
            "dpo",
            [
                {"chosen": [user(f"Q{i}?"), bot("good answer")], "rejected": [user(f"Q{i}?"), bot("bad")]}
                for i in range(4)
            ],
        ),
        (
            "sft",
            [
                {"messages": [user(f"Hi {i}"), {**bot("skip"), "weight": 0}, user("again"), bot("train me")]}
                for i in range(4)
            ],
        ),
    ],
)
def test_a_tiny_run_trains_on_a_community_layout(tmp_path, method, rows):
    from align_cli.testing import compose
    from align_cli.train import train

    path = write(tmp_path, "d.jsonl", rows)
    overrides = [
        f"method={method}",
        f"data.path={path}",
        "data.eval_ratio=0",
        "method.args.max_steps=1",
        "method.args.per_device_train_batch_size=2",
        "plot=false",
    ]
    result = train(compose(overrides, tmp_path / "run"))
    assert result is not None and (tmp_path / "run" / "metrics.jsonl").exists()


# ChatML that also renders tool schemas and tool calls (the tiny model's own template does not).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_rows_train_with_a_template_that_renders_them(tmp_path):
    """Tool calls reach the template as written: no `unit: None` from another row's arguments."""
    from align_cli.testing import compose
    from align_cli.train import train

    def call(args):
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}],
        }

    rows = [
        {
            "messages": [
                user("Oslo?"),
                call({"city": "Oslo"}),
                {"role": "tool", "content": "-3"},
                bot("-3 C."),
            ],
            "tools": [WEATHER_TOOL],
        },
        {
            "messages": [user("In F?"), call({"unit": "F"}), {"role": "tool", "content": "27"}, bot("27 F.")],
            "tools": [WEATHER_TOOL],
        },
    ]
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE, encoding="utf-8")
    path = write(tmp_path, "tools.jsonl", rows)
    overrides = ["method=sft", f"data.path={path}", "data.eval_ratio=0", f"model.chat_template={template}"]
    cfg = compose(
        [*overrides, "method.args.max_steps=1", "method.args.per_device_train_batch_size=2", "plot=false"],
        tmp_path / "run",
    )
    from align_cli.data.preview import preview

    shown = preview(cfg, rows=2, rendered=True)
    assert shown[0]["messages"][0] == user("Oslo?")  # no tool_calls: None added to a user turn
    assert '<tool_call>get_weather {"city": "Oslo"}</tool_call>' in shown[0]["rendered"]
    assert '<tool_call>get_weather {"unit": "F"}</tool_call>' in shown[1]["rendered"]
    assert "get_weather" in shown[0]["rendered"].split("<|im_end|>")[0]  # the tools reached the template
    train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_conversations_with_role_and_content_turns(tmp_path):
    rows = [{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    assert load(write(tmp_path, "ax.jsonl", rows), "sft")[0] == {"messages": [user("Hi"), bot("Hello")]}


def test_a_weight_outside_sft_is_named_and_expansions_are_said(tmp_path, caplog):
    rows = [{"prompt": [user("q")], "chosen": [{**bot("a"), "weight": 1}], "rejected": [bot("b")]}]
    with caplog.at_level(logging.WARNING, logger="align"):
        load(write(tmp_path, "pw.jsonl", rows), "preference")
        load(
            write(tmp_path, "ex.jsonl", [{"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]}]),
            "pointwise",
            False,
        )
    assert "message key 'chosen[].weight' is not read (1 message)" in caplog.text
    assert "1 rows became 2 training rows (one per response and score)" in caplog.text


def test_ultrafeedback_raw_completions_are_refused_with_the_way_on(tmp_path):
    rows = [
        {
            "prompt": "p",
            "completions": [
                {"model": "m", "response": "a", "overall_score": 7},
                {"model": "n", "response": "b", "overall_score": 3},
            ],
        }
    ]
    with pytest.raises(AlignError, match=r"raw\.jsonl:1: column 'completions' holds objects.*'scores'"):
        load(write(tmp_path, "raw.jsonl", rows), "listwise", False)


def test_a_ranking_file_for_pairwise_points_to_listwise_not_prompt_data(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}]
    with pytest.raises(
        AlignError, match=r"look like listwise data \(listwise\), which method=rm method\.mode=listwise takes"
    ):
        load(write(tmp_path, "rk.jsonl", rows), "preference", False)


def test_eval_path_may_be_a_list_and_too_long_is_checked(tmp_path):
    a = write(tmp_path, "a.jsonl", [{"prompt": "p1", "completion": "x"}])
    b = write(tmp_path, "b.jsonl", [{"prompt": "p2", "completion": "y"}, {"prompt": "p3", "completion": "z"}])
    c = write(tmp_path, "c.jsonl", [{"prompt": "p4", "completion": "w"}])
    train, evaluation = read_splits(DataConfig(path=a, eval_path=[b, c]), "sft", False).loaded()
    assert [r["prompt"] for r in evaluation.rows] == ["p2", "p3", "p4"] and len(train.rows) == 1
    with pytest.raises(AlignError, match=r"data\.too_long=cut is not valid: use refuse, drop or truncate"):
        DataConfig(path=a, too_long="cut")


def test_turns_of_one_conversation_stay_in_one_split(tmp_path):
    rows = [
        {"messages": [user(f"q{i}"), {**bot(f"a{i}"), "weight": 1}, user("more"), bot(f"b{i}")]}
        for i in range(10)
    ]
    train, evaluation = read_splits(
        DataConfig(path=write(tmp_path, "c.jsonl", rows), eval_ratio=0.2), "sft", True
    ).loaded()
    assert len(train.rows) + len(evaluation.rows) == 20 and len(evaluation.rows) == 4
    assert not set(train.origins) & set(evaluation.origins)


def test_a_users_own_data_config_folder(tmp_path):
    from align_cli.testing import compose
    from align_cli.train import checked_config

    data = write(tmp_path, "mine.jsonl", [{"prompt": "p", "completion": "c"}])
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mine.yaml").write_text(f"path: {data}\nformat: auto\n", encoding="utf-8")
    cfg = compose(
        ["method=sft", "data=mine", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"], tmp_path / "run"
    )
    _, _, data_cfg = checked_config(cfg)
    assert data_cfg.path == data and load(data_cfg.path, "sft", False) == [{"prompt": "p", "completion": "c"}]
