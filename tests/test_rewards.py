"""Reward functions (align_cli/rewards): rule rewards on hand-made completions, the config
builder, user functions by import path, and the errors a user sees."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from align_cli.errors import AlignError
from align_cli.rewards import build_reward_functions, check_columns
from align_cli.rewards.rules import last_number

CHAT = [{"role": "user", "content": "What is 12 plus 30?"}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def one(cfg: dict):
    funcs, weights = build_reward_functions(cfg)
    assert len(funcs) == 1
    return funcs[0], weights[0]


def test_length_reward_values_plain_and_conversational():
    f, w = one({"length": {"target": 10}})
    assert w == 1.0 and f.__name__ == "length"
    # 1 - |len - 10| / 10: 10 chars -> 1.0, 5 -> 0.5, 15 -> 0.5, 30 -> -1.0
    out = f(["p"] * 4, ["a" * 10, "a" * 5, "a" * 15, "a" * 30])
    assert out == pytest.approx([1.0, 0.5, 0.5, -1.0])
    # Conversational: the assistant content is measured; a CJK character counts once.
    assert f([CHAT], [reply("四十二" * 2 + "abcd")]) == pytest.approx([1.0])
    words, _ = one({"w": {"type": "length", "target": 4, "unit": "words"}})
    assert words(["p"], ["one two"]) == pytest.approx([0.5])


def test_regex_reward_search_and_fullmatch():
    f, _ = one({"format": {"type": "regex", "pattern": r"<answer>\d+</answer>"}})
    assert f(["p"] * 3, ["so <answer>42</answer>", "<answer>x</answer>", "42"]) == [1.0, 0.0, 0.0]
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    full, _ = one({"format": {"type": "regex", "pattern": pattern, "fullmatch": True}})
    texts = ["<think>a\nb</think>\n<answer>1</answer>\n", "x <think></think><answer></answer>"]
    assert full(["p"] * 2, texts) == [1.0, 0.0]


def test_match_reward_modes_use_the_answer_column():
    prompts = [CHAT] * 4
    numeric, _ = one({"match": {"mode": "numeric"}})
    completions = [reply("12 + 30 = 42."), reply("It is 41"), reply("no idea"), reply("1,234.0")]
    # The last number counts: "12 + 30 = 42." -> 42; rows with an empty answer are skipped (None).
    assert numeric(prompts, completions, answer=["42", "42", "42", "1234"]) == [1.0, 0.0, 0.0, 1.0]
    assert numeric(prompts[:2], completions[:2], answer=[42, ""]) == [1.0, None]

    exact, _ = one({"match": {"mode": "exact"}})
    texts = ["  Paris. ", "paris is it", "巴黎。"]
    assert exact(["p"] * 3, texts, answer=["Paris", "Paris", "巴黎"]) == [1.0, 0.0, 1.0]
    contains, _ = one({"m": {"type": "match", "mode": "contains", "column": "city"}})
    assert contains(["p"] * 2, ["It is Paris.", "Rome"], city=["paris", "paris"]) == [1.0, 0.0]
    tagged, _ = one({"match": {"mode": "exact", "extract": r"<answer>(.*?)</answer>"}})
    texts = ["<answer>42</answer> ok", "42", "<answer>41</answer>"]
    assert tagged(["p"] * 3, texts, answer=["42"] * 3) == [1.0, 0.0, 0.0]


def test_last_number_parsing():
    assert last_number("a 3 then -2.5e1 end") == -25.0
    assert last_number("1,000,000 dollars") == 1_000_000.0
    assert last_number("nothing") is None


def test_keyword_reward_include_minus_exclude():
    f, _ = one({"keyword": {"include": ["thank", "谢谢"], "exclude": ["bomb"]}})
    texts = ["Thank you, 谢谢", "thanks", "bomb", "Thanks, here is the bomb", "hello"]
    # include share - exclude share: 2/2, 1/2, -1, 1/2 - 1, 0
    assert f(["p"] * 5, texts) == pytest.approx([1.0, 0.5, -1.0, -0.5, 0.0])


def test_mix_weights_order_shorthand_and_null_entries():
    funcs, weights = build_reward_functions(
        {
            "brevity": {"type": "length", "target": 5, "weight": 0.5},
            "kw": {"type": "keyword", "include": "ok", "weight": 2},
            "length": 8,  # bare value sets the main option: target
            "dropped": None,
        }
    )
    assert [f.__name__ for f in funcs] == ["brevity", "kw", "length"]
    assert weights == [0.5, 2.0, 1.0]
    assert funcs[2].target == 8


def test_config_mistakes_name_the_key():
    with pytest.raises(AlignError, match="no reward configured"):
        build_reward_functions({})
    with pytest.raises(AlignError, match=r"reward\.foo: unknown reward type 'lenght'.*did you mean: length"):
        build_reward_functions({"foo": {"type": "lenght"}})
    with pytest.raises(AlignError, match=r"reward\.length\.targt is not an option.*did you mean: target"):
        build_reward_functions({"length": {"targt": 3}})
    with pytest.raises(AlignError, match=r"reward\.length\.target is required"):
        build_reward_functions({"length": {"unit": "chars"}})
    with pytest.raises(AlignError, match=r"reward\.fmt\.pattern='\(' is not a valid regular expression"):
        build_reward_functions({"fmt": {"type": "regex", "pattern": "("}})
    with pytest.raises(AlignError, match=r"reward\.length\.weight='x' must be a number"):
        build_reward_functions({"length": {"target": 3, "weight": "x"}})
    with pytest.raises(AlignError, match=r"reward\.model\.path is required: set reward\.model\.path="):
        build_reward_functions({"model": {"path": "???", "weight": 1.0}})  # conf/reward/model.yaml as is
    f, _ = one({"match": {"column": "answer"}})
    # Checked before training against the dataset's columns, and again at call time.
    with pytest.raises(
        AlignError, match=r"reward\.match reads the column 'answer', which x\.jsonl does not .*: topic"
    ):
        check_columns([f], ["prompt", "topic"], "x.jsonl")
    check_columns([f], ["prompt", "answer"])
    with pytest.raises(AlignError, match=r"column 'answer', which the data does not have; columns: topic"):
        f(["p"], ["c"], topic=["t"], trainer_state=None)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `my_rewards` in the working directory, as a user would write it."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def shout(prompts, completions, **kwargs):
                return [float(c.count("!")) for c in completions]

            def only_answer(completions, answer):  # no **kwargs: gets only what it names
                return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

            def scaled(prompts, completions, scale=1.0, **kwargs):
                return [scale * len(c) for c in completions]

            def broken(prompts, completions, **kwargs):
                raise KeyError("solution")

            def wrong_length(prompts, completions, **kwargs):
                return [1.0]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_user_function_by_import_path(user_module):
    f, _ = one({"function": "my_rewards:shout"})
    assert f.__name__ == "function"
    assert f(["p", "p"], ["hi!!", "hi"], trainer_state=None, completion_ids=[[1], [2]]) == [2.0, 0.0]
    g, _ = one({"ans": {"type": "function", "path": "my_rewards:only_answer"}})
    assert g(["p", "p"], ["the 42", "41"], answer=["42", "42"], trainer_state=None) == [1.0, 0.0]
    h, _ = one({"s": {"type": "function", "path": "my_rewards:scaled", "kwargs": {"scale": 2}}})
    assert h(["p"], ["abc"]) == [6.0]
    by_file, _ = one({"function": f"{user_module / 'my_rewards.py'}:shout"})
    assert by_file(["p"], ["!"]) == [1.0]


def test_user_function_errors_name_the_path(user_module):
    with pytest.raises(AlignError, match=r"reward\.function\.path='nope_mod:f': no module named 'nope_mod'"):
        build_reward_functions({"function": "nope_mod:f"})
    with pytest.raises(AlignError, match=r"module 'my_rewards' has no function 'shou'.*did you mean: shout"):
        build_reward_functions({"function": "my_rewards:shou"})
    with pytest.raises(AlignError, match=r"must look like 'module:function'"):
        build_reward_functions({"function": "my_rewards.shout"})
    with pytest.raises(AlignError, match=r"file 'missing\.py' does not exist"):
        build_reward_functions({"function": "missing.py:f"})
    broken, _ = one({"function": "my_rewards:broken"})
    with pytest.raises(
        AlignError, match=r"reward function 'my_rewards:broken' \(reward\.function\) raised KeyError"
    ):
        broken(["p"], ["c"])
    wrong, _ = one({"function": "my_rewards:wrong_length"})
    with pytest.raises(
        AlignError, match=r"'my_rewards:wrong_length' .* returned 1 values; .* list of 2 floats"
    ):
        wrong(["p", "p"], ["a", "b"])


def test_user_functions_may_be_async(user_module):
    """`async def` reward functions (TRL allows them) are awaited, even from inside a running loop."""
    import asyncio

    (user_module / "async_rewards.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            async def judge(prompts, completions, answer, **kwargs):
                await asyncio.sleep(0)
                return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

            async def broken(prompts, completions, **kwargs):
                await asyncio.sleep(0)
                raise TimeoutError("judge did not answer")
            """
        )
    )
    f, _ = one({"judge": {"type": "function", "path": "async_rewards:judge"}})
    assert f(["p", "p"], ["it is 42", "41"], answer=["42", "42"]) == [1.0, 0.0]

    async def from_a_notebook():  # the caller's thread already runs an event loop
        return f(["p"], ["42"], answer=["42"])

    assert asyncio.run(from_a_notebook()) == [1.0]
    broken, _ = one({"function": "async_rewards:broken"})
    with pytest.raises(AlignError, match=r"'async_rewards:broken' \(reward\.function\) raised TimeoutError"):
        broken(["p"], ["c"])
    sys.modules.pop("async_rewards", None)


def test_trl_logging_callables_are_tolerated_and_passed_on(user_module, caplog):
    """TRL's GRPO passes log_metric / log_extra: rule rewards ignore them, user functions get them,
    and where a trainer does not pass them (our PPO loop) a function that uses them still runs."""
    logged: list = []
    trl_extras = {
        "log_metric": lambda name, value: logged.append((name, value)),
        "log_extra": lambda column, values: logged.append((column, values)),
        "trainer_state": None,
        "completion_ids": [[1]],
    }
    rules = {
        "length": 3,
        "format": {"type": "regex", "pattern": "a"},
        "match": {"mode": "numeric"},
        "keyword": {"include": ["a"]},
    }
    funcs, _ = build_reward_functions(rules)
    for f in funcs:
        assert f(["p"], ["a 1"], answer=["1"], **trl_extras) == [pytest.approx(1.0)], f.__name__

    (user_module / "logging_rewards.py").write_text(
        textwrap.dedent(
            """
            def named(prompts, completions, log_metric, log_extra):
                log_metric("named/len", float(len(completions[0])))
                log_extra("why", ["long"])
                return [1.0]

            def through_kwargs(prompts, completions, **kwargs):
                kwargs["log_metric"]("kw/count", 1.0)
                return [2.0]
            """
        )
    )
    named, _ = one({"function": "logging_rewards:named"})
    kw, _ = one({"function": "logging_rewards:through_kwargs"})
    assert named(["p"], ["abc"], **trl_extras) == [1.0] and kw(["p"], ["abc"], **trl_extras) == [2.0]
    assert logged == [("named/len", 3.0), ("why", ["long"]), ("kw/count", 1.0)]
    # Called as our PPO loop calls reward functions (no logging callables): runs, warns once.
    with caplog.at_level("WARNING", logger="align"):
        assert named(["p"], ["abc"], trainer_state=None) == [1.0]
        assert named(["p"], ["abc"], trainer_state=None) == [1.0]
    warnings = [r.getMessage() for r in caplog.records if "does not record" in r.getMessage()]
    assert len(warnings) == 2 and "calls log_metric" in warnings[0] and "calls log_extra" in warnings[1]
    sys.modules.pop("logging_rewards", None)


# --- text rendering ------------------------------------------------------------------------------


def test_message_text_keeps_a_prompts_whole_conversation():
    from align_cli.rewards import message_text

    multi_turn = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ]
    assert message_text(multi_turn) == (
        "System: Be brief.\n\nUser: What is 2+2?\n\nAssistant: 4\n\nUser: And times 3?"
    )
    assert message_text(CHAT) == "What is 12 plus 30?"  # a lone turn is its text
    # Completions: the assistant's content only, also around tool results.
    assert message_text(reply("42")) == "42"
    tool_use = [*reply("calling"), {"role": "tool", "content": "42"}, *reply("It is 42.")]
    assert message_text(tool_use) == "calling\nIt is 42."
    parts = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}]
    assert message_text(parts) == "Describe"


# --- data values the rewards cannot use -----------------------------------------------------


def test_row_check_finds_answers_without_a_number():
    from align_cli.rewards import row_check

    check = row_check({"match": {"mode": "numeric"}, "length": 10, "function": {"path": "not_built:f"}})
    assert check({"prompt": "p", "answer": "The answer is 1,234."}) is None
    assert check({"prompt": "p", "answer": 7}) is None
    assert check({"prompt": "p", "answer": ""}) is None  # no answer: the row is skipped, not wrong
    assert check({"prompt": "p"}) is None  # a missing column is check_columns' to report
    problem = check({"prompt": "p", "answer": "four"})
    assert problem.startswith(
        "reward.match (mode=numeric) compares with the column 'answer', whose value 'four'"
    )
    assert row_check({"match": {"mode": "exact"}})({"prompt": "p", "answer": "four"}) is None
    assert row_check({"length": 10, "keyword": ["a"]}) is None  # no reward here reads values
    assert row_check(None) is None and row_check({}) is None


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_an_answer_without_a_number_stops_the_run_before_training(method, tmp_path, monkeypatch):
    """Named by file:line and column while the data is read, before any model loads."""
    import align_cli.methods.base as base
    from align_cli.testing import compose
    from align_cli.train import train

    path = tmp_path / "arith.jsonl"
    rows = [("2+2?", "4"), ("3+3?", "6"), ("2+2, in words?", "four"), ("1+1?", "2"), ("5+5?", "ten")]
    path.write_text("".join(f'{{"prompt": "{q}", "answer": "{a}"}}\n' for q, a in rows))
    monkeypatch.setattr(base.MethodContext, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    overrides = [f"method={method}", "reward=match", "reward.match.mode=numeric", f"data.path={path}"]
    with pytest.raises(
        AlignError,
        match=rf"^{path}:3: reward\.match \(mode=numeric\) compares with the column 'answer', "
        r"whose value 'four' holds no number.* \(and 1 more problem in ",
    ):
        train(compose([*overrides, "method.args.max_steps=1", "plot=false"], tmp_path / "run"))
    if method == "grpo":  # `align data validate` lists every such row
        from align_cli.validate import validate

        report = validate(compose(overrides))
        assert [p.split(": ")[0] for p in report.splits[0].problems] == [f"{path}:3", f"{path}:5"]


# --- reward models: what the path must hold ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders a user might pass as reward.model.path, keyed by what they are."""
    import json
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align_cli import modeling
    from align_cli.config import ModelConfig
    from align_cli.testing import compose
    from align_cli.train import train

    root = tmp_path_factory.mktemp("checkpoints")
    tiny = modeling.build_tiny_model()
    tokenizer = modeling.load_tokenizer(ModelConfig())
    out = {"causal_lm": tiny}

    def save(model, name: str):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name

    torch.manual_seed(0)
    pad = tokenizer.pad_token_id
    save(
        AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1, pad_token_id=pad), "classifier"
    )
    save(
        AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2, pad_token_id=pad),
        "two_outputs",
    )
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    save(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), lora), "sft_adapter")
    # A config that claims a classifier over weights without a head (a hand-edited SFT folder).
    shutil.copytree(tiny, root / "headless")
    config = json.loads((root / "headless" / "config.json").read_text())
    config.update(
        architectures=["Qwen2ForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}
    )
    (root / "headless" / "config.json").write_text(json.dumps(config))
    out["headless"] = root / "headless"
    # An `rm` run with LoRA: adapter + the trained head (modules_to_save), no config.json.
    rm_lora = root / "rm_lora"
    train(
        compose(
            ["method=rm", "peft=lora", "peft.r=4", "method.args.max_steps=1", "data.eval_ratio=0"], rm_lora
        )
    )
    out["rm_lora"] = rm_lora
    # The same adapter without its head.
    shutil.copytree(rm_lora, root / "rm_lora_headless")
    weights = load_file(rm_lora / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "score" not in k},
        root / "rm_lora_headless" / "adapter_model.safetensors",
    )
    out["rm_lora_headless"] = root / "rm_lora_headless"
    return out


def test_reward_model_path_must_hold_a_trained_one_output_head(checkpoints):
    """A causal LM (base model, SFT run, SFT adapter) would load with a random head: refused by name."""
    from safetensors.torch import load_file

    head = r"has no trained classification head: "
    hint = (
        r".*train one with `align train method=rm`, or pass a sequence-classification model with one output$"
    )
    refused = {
        "causal_lm": r"it is a Qwen2ForCausalLM \(a causal LM, e\.g\. a base model or an SFT run\), not a reward model",
        "sft_adapter": r"it holds a LoRA adapter for task_type CAUSAL_LM \(e\.g\. an SFT run\), not a reward model",
        "headless": r"its checkpoint stores no score\.weight, so the head would be random",
        "rm_lora_headless": r"its LoRA adapter saves none .* is Qwen2ForCausalLM",
    }
    for name, why in refused.items():
        path = str(checkpoints[name])
        with pytest.raises(AlignError, match=rf"^reward\.model\.path='{path}' {head}{why}{hint}"):
            build_reward_functions({"model": path})
    with pytest.raises(AlignError, match=rf"^reward\.model\.path='tiny' {head}it is a Qwen2ForCausalLM"):
        build_reward_functions({"model": "tiny"})
    with pytest.raises(
        AlignError, match=r"'.*two_outputs' is a classifier with 2 outputs; a reward model has exactly one"
    ):
        build_reward_functions({"model": str(checkpoints["two_outputs"])})

    # Accepted: a saved one-output classifier, and an `rm` LoRA run folder whose head is the trained one.
    f, _ = one({"model": str(checkpoints["classifier"])})
    assert f.model.config.num_labels == 1
    f, _ = one({"rm": {"type": "model", "path": str(checkpoints["rm_lora"])}})
    trained = load_file(checkpoints["rm_lora"] / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert torch.equal(f.model.score.weight.detach().float(), trained.float())


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_causal_lm_as_reward_model_stops_grpo_and_ppo_before_loading(
    method, checkpoints, tmp_path, monkeypatch
):
    """Both methods (and PPO's critic, which starts from the reward model) build rewards through ModelReward."""
    import align_cli.methods.base as base
    from align_cli.testing import compose
    from align_cli.train import train

    monkeypatch.setattr(base.MethodContext, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    overrides = [f"method={method}", "reward=model", f"reward.model.path={checkpoints['sft_adapter']}"]
    with pytest.raises(
        AlignError, match=r"^reward\.model\.path='.*sft_adapter' has no trained classification head"
    ):
        train(compose([*overrides, "method.args.max_steps=1", "plot=false"], tmp_path / "run"))


def test_reward_model_path_mistakes_fail_fast_and_name_the_key(tmp_path, monkeypatch):
    """No hub retries for a local-looking mistake, and the message names reward.<entry>.path."""
    import huggingface_hub.constants

    import align_cli.modeling as modeling

    def no_loading(*args, **kwargs):
        pytest.fail("the model loader was called")

    monkeypatch.setattr(modeling, "load_tokenizer", no_loading)
    monkeypatch.setattr(modeling, "load_model", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    where = r": point reward\.rm\.path at an `rm` run folder, a saved reward model, or a hub id"

    def refused(path: str, message: str) -> None:
        with pytest.raises(AlignError, match=rf"^reward\.rm\.path='{path}' {message}") as err:
            build_reward_functions({"rm": {"type": "model", "path": path}})
        assert "model.name_or_path" not in str(err.value) and "\n" not in str(err.value)

    for offline in (False, True):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        refused(
            "runs/nonexist",
            r"does not exist \(there is a local folder 'runs/', so it is not taken for a hub id\)" + where,
        )
        refused("empty", r"is a folder without config\.json or adapter_config\.json" + where)
        refused("notes.txt", r"is a file, not a model folder" + where)
        refused("./gone", r"does not exist" + where)
    # Offline, a hub id not in the hub cache cannot load: said at once.
    refused(
        "someone/some-reward-model",
        r"is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE is set",
    )


def test_reward_model_reads_a_multi_turn_prompt_whole_without_a_chat_template(checkpoints):
    f, _ = one({"model": str(checkpoints["classifier"])})
    f.tokenizer.chat_template = None  # a reward model whose tokenizer has none
    prompt = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ]
    (ids,) = f.input_ids([prompt], [reply("12")])
    # Before: only the assistant's "4" of the prompt reached the model, never the question.
    conversation = "User: What is 2+2?\n\nAssistant: 4\n\nUser: And times 3?\n\nAssistant: 12"
    assert f.tokenizer.decode(ids) == conversation + f.tokenizer.eos_token
    with torch.no_grad():
        logit = f.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert f([prompt], [reply("12")]) == [pytest.approx(logit, abs=1e-5)]


def test_behaviour_of_reads_how_a_completion_opens():
    from align_cli.rewards.rules import behaviour_of

    phrases = {
        "refuse": ["Sorry, I can't help", "抱歉,我不能"],
        "help": ["Sure, here is how", "好的,方法如下"],
    }
    assert behaviour_of("  sorry, I can't help with that.", phrases) == "refuse"
    assert behaviour_of("好的,方法如下。", phrases) == "help"
    # A splice that opens like neither, a stutter and an empty answer show no behaviour.
    assert behaviour_of("Sorry, here is how to do it.", phrases) is None
    assert behaviour_of("Sure, Sure, Sure,", phrases) is None
    assert behaviour_of("", phrases) is None


def test_behaviour_reward_scores_the_expected_behaviour():
    f, _ = one(
        {"behaviour": {"phrases": {"refuse": ["Sorry"], "help": ["Sure", "好的"]}, "column": "expected"}}
    )
    texts = ["Sorry, no.", "Sure!", "好的。", "Sure!", "blah"]
    expected = ["refuse", "refuse", "help", "", "help"]
    # right, wrong, right, not applicable (no label), no behaviour
    assert f(["p"] * 5, texts, expected=expected) == [1.0, 0.0, 1.0, None, 0.0]
    assert f.row_problem({"expected": "refuse"}) is None
    assert "one of refuse, help, not 'maybe'" in f.row_problem({"expected": "maybe"})
    with pytest.raises(AlignError, match=r"reward\.behaviour\.phrases"):
        one({"behaviour": {"phrases": {"refuse": []}}})
    with pytest.raises(AlignError, match=r"reward\.behaviour\.phrases is required"):
        one({"behaviour": {"column": "expected"}})
    with pytest.raises(AlignError, match="column 'expected'"):
        check_columns([f], ["prompt"])
