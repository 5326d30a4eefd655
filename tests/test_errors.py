"""Bad input fails early with one line that says what is wrong and what would be valid.

Each case drives the real `align` entry (`align_cli.cli.main`) and checks the exit code and
the message; a few run `align` in a subprocess to check that stderr is one line with no
traceback (and that `debug=true` brings the traceback back).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_cli.cli import main as align
from align_cli.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]

# Files the cases point at ({tmp}/<name>); written fresh for every test.
FILES: dict[str, str | bytes] = {
    "sft.jsonl": '{"prompt": "p", "completion": "a"}\n',
    "bad_json.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n',
    "latin1.jsonl": '{"prompt": "caf\xe9", "completion": "a"}\n'.encode("latin-1"),
    "empty.jsonl": "\n\n",
    "kto_tag.jsonl": '{"instruction": "q", "output": "a", "kto_tag": "maybe"}\n',
    "same.jsonl": '{"prompt": "p", "chosen": "same", "rejected": "same"}\n',
    "blank.jsonl": '{"prompt": "   ", "chosen": "a", "rejected": "b"}\n',
    "one_missing.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n',
    "score.jsonl": '{"prompt": "p", "completion": "a", "score": "high"}\n',
    "responses.jsonl": '{"instruction": "q", "responses": ["only one"]}\n',
    "not_list.jsonl": '{"instruction": "q", "responses": "a, b"}\n',
    "wide.csv": "prompt,chosen,rejected\np,a,b\np,a,b,extra\n",
    "typed.jsonl": '{"prompt": 42, "chosen": "a", "rejected": "b"}\n',
    "rankings.jsonl": '{"prompt": "p", "completions": ["a", "b"], "rankings": [1, 0]}\n',
    "bool_rank.jsonl": '{"prompt": "p", "completions": ["a", "b"], "ranking": [true, false]}\n',
    # Characters str.splitlines() breaks at, unescaped inside a value as json.dumps(ensure_ascii=False)
    # writes them (it escapes the control characters among them): row 1 is valid, row 2 is bad.
    "u2028.jsonl": json.dumps(
        {"prompt": "a\u2028b\u2029c\x85d\x0be\x1cf", "chosen": "a", "rejected": "b"}, ensure_ascii=False
    )
    + '\n{"prompt": "p", "chosen": "", "rejected": "b"}\n',
    "badquote.csv": 'prompt,chosen,rejected\np1,a,b\np2,"a,b\np3,a,b\np4,a,b\n',
    "question.csv": "question,good,bad\nq1,yes,no\n",
    # A maths file: one answer written as a number, the others as text (issue 10, section 4).
    "mixed.jsonl": '{"prompt": "1+1", "answer": 56}\n{"prompt": "2+2", "answer": "four"}\n'
    '{"prompt": "3+3", "answer": "6"}\n{"prompt": "4+4", "answer": "8"}\n',
    "noanswer.jsonl": '{"prompt": "q1"}\n{"prompt": "q2"}\n{"prompt": "q3"}\n',
    "wrapped.json": json.dumps(
        {
            "data": [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"prompt": "p", "chosen": "", "rejected": "b"},
            ]
        },
        indent=2,
    ),
}

# (argv, message it must contain, exit code). `{tmp}` is the test's folder.
CASES = [
    # The command line: Hydra groups and keys, one line instead of Hydra's report.
    (["train", "method=foo"], "unknown method 'foo': choose one of dpo, grpo, kto, ppo, rm, sft", 1),
    (["train"], "no method chosen: add method=<dpo|grpo|kto|ppo|rm|sft>", 1),
    (["train", "method=dpo", "model=nope"], "unknown model option 'nope': choose one of llama3.2-1b", 1),
    (["train", "method=dpo", "peft=qlora"], "unknown peft option 'qlora' (did you mean: lora?)", 1),
    (["train", "method=dpo", "quant=3bit"], "unknown quant option '3bit'", 1),
    (
        ["train", "method=dpo", "model.nme_or_path=x"],
        "model.nme_or_path: 'nme_or_path' is not a model option (did you mean: name_or_path?)",
        1,
    ),
    (["train", "method=dpo", "methd=sft"], "'methd' is not an align option (did you mean: method?)", 1),
    (["train", "method=dpo", "seed=abc"], "seed=abc: Value 'abc' of type 'str' could not be converted", 1),
    (["train", "method=dpo", "method.args.beta=[1,"], "cannot parse 'method.args.beta=[1,'", 1),
    (["train", "method=dpo", "method.args.beta=0.1,0.5"], "add -m to run one job per value", 1),
    (["train", "method=dpo", "+model.foo=1"], "model.foo is not a model option", 1),
    (["train", "-m", "method=dpo,foo"], "unknown method 'foo'", 1),
    (
        ["train", "method=dpo", "method.args.betta=0.2", "output_dir={tmp}/run"],
        "method.args.betta is not a DPOConfig option (did you mean: beta",
        1,
    ),
    (["data", "check"], "unknown data command 'check'", 2),
    # The model and quantization.
    (
        ["train", "method=dpo", "model.name_or_path=/no/such/model", "output_dir={tmp}/run"],
        "model path '/no/such/model' does not exist",
        1,
    ),
    (["train", "method=dpo", "quant=4bit", "output_dir={tmp}/run"], "quant=4bit needs peft=lora", 1),
    # The run folder.
    (
        ["train", "method=dpo", "resume=true", "output_dir={tmp}/run"],
        "resume=true: {tmp}/run holds no complete checkpoint",
        1,
    ),
    (
        ["train", "method=dpo", "resume={tmp}/nowhere", "output_dir={tmp}/run"],
        "resume={tmp}/nowhere: no such folder",
        1,
    ),
    (["train", "method=dpo", "resume=true"], "resume=true continues a run: name its folder", 1),
    (["train", "method=dpo", "output_dir={tmp}/done"], "output_dir={tmp}/done holds a finished run", 1),
    # The data, at train time: before any model is loaded.
    (
        ["train", "method=dpo", "data.path={tmp}/sft.jsonl", "output_dir={tmp}/run"],
        "missing required column(s) for preference data: need [instruction, chosen, rejected] or "
        "[prompt, chosen, rejected]; columns found: completion, prompt; these columns look like sft data",
        1,
    ),
    (
        ["train", "method=dpo", "data.format=kto", "output_dir={tmp}/run"],
        "data.format=kto holds kto data, but this method needs preference data",
        1,
    ),
    (
        ["train", "method=sft", "data.path={tmp}/missing.jsonl", "output_dir={tmp}/run"],
        "missing.jsonl' does not exist",
        1,
    ),
    (
        ["train", "method=sft", "data.path={tmp}/latin1.jsonl", "output_dir={tmp}/run"],
        "latin1.jsonl:1: not UTF-8",
        1,
    ),
    (
        ["train", "method=dpo", "data.path={tmp}/bad_json.jsonl", "output_dir={tmp}/run"],
        "bad_json.jsonl:2: malformed JSON",
        1,
    ),
    (
        ["train", "method=sft", "data.path={tmp}/empty.jsonl", "output_dir={tmp}/run"],
        "empty.jsonl: the dataset is empty",
        1,
    ),
    (
        ["train", "method=kto", "data.path={tmp}/kto_tag.jsonl", "output_dir={tmp}/run"],
        "kto_tag.jsonl:1: column 'kto_tag' must be true or false, got 'maybe'",
        1,
    ),
    (
        ["train", "method=dpo", "data.path={tmp}/same.jsonl", "output_dir={tmp}/run"],
        "same.jsonl:1: 'chosen' and 'rejected' are identical",
        1,
    ),
    (
        ["train", "method=dpo", "data.path={tmp}/one_missing.jsonl", "output_dir={tmp}/run"],
        "one_missing.jsonl:2: missing column(s) rejected; this row has: prompt, chosen",
        1,
    ),
    (
        ["train", "method=dpo", "model.max_length=20", "output_dir={tmp}/run"],
        "34 of 108 prompts are longer than 19 tokens (model.max_length=20 leaves no room for the answer); "
        "first: ",
        1,
    ),
    # Values of the right key but the wrong type or range: named before any model loads.
    (
        ["train", "method=dpo", "method.args.beta=abc"],
        "method.args.beta='abc' is not valid: DPOConfig.beta must be a number",
        1,
    ),
    (
        ["train", "method=dpo", "method.args.learning_rate=-1"],
        "method.args.learning_rate=-1 must not be negative",
        1,
    ),
    (
        ["train", "method=kto", "method.args.per_device_train_batch_size=0"],
        "per_device_train_batch_size=0 must be at least 1",
        1,
    ),
    (["train", "method=sft", "method.args.num_train_epochs=-1"], "num_train_epochs=-1 trains nothing", 1),
    (["train", "method=dpo", "model.max_length=0"], "model.max_length=0 is not valid", 1),
    (["train", "method=dpo", "data.max_samples=0"], "data.max_samples=0 must be at least 1, or null", 1),
    (["data", "validate", "method=dpo", "data.eval_ratio=-0.5"], "data.eval_ratio=-0.5 must be in [0, 1)", 1),
    (
        ["data", "validate", "method=dpo", "method.args.bta=1"],
        "method.args.bta is not a DPOConfig option (did you mean: beta",
        1,
    ),
    # Keys added with `+` that nothing would read.
    (
        ["train", "method=rm", "+method.mdoe=listwise"],
        "method.mdoe: 'mdoe' is not a key of method=rm (trainer settings go under method.args.<key>) "
        "(did you mean: mode",
        1,
    ),
    (["train", "method=dpo", "+foo=1"], "'foo' is not an align option", 1),
    (["train", "method=dpo", "reward=length"], "method=dpo takes no reward (only ppo and grpo do)", 1),
    # The data, with `align data validate` (also for methods whose trainers live elsewhere).
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/blank.jsonl"],
        "blank.jsonl:1: column 'prompt' is empty",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/typed.jsonl"],
        "typed.jsonl:1: column 'prompt' must be a string, got int 42",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=pointwise", "data.path={tmp}/score.jsonl"],
        "score.jsonl:1: column 'score' must be a number, got 'high'",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=listwise", "data.path={tmp}/responses.jsonl"],
        "responses.jsonl:1: column 'responses' must hold at least 2 responses, got 1",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=listwise", "data.path={tmp}/not_list.jsonl"],
        "not_list.jsonl:1: column 'responses' must be a list of strings, got str",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/wide.csv"],
        "wide.csv:3: 4 values for 3 header columns",
        1,
    ),
    (["data", "validate", "method=kto", "data.path={tmp}/kto_tag.jsonl"], "1 problem in", 1),
    # Evaluation splits that are not there: never the training rows instead.
    (
        ["train", "method=rm", "method.mode=pointwise", "data.eval_split=test", "output_dir={tmp}/run"],
        "data.eval_split=test: ",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=pointwise", "data.eval_split=test"],
        "rm_pointwise.jsonl is a single file, so it has no split 'test'",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/same.jsonl", "data.eval_path={tmp}/same.jsonl"],
        "same.jsonl, which training reads too",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=listwise", "data.path={tmp}/rankings.jsonl"],
        "column 'rankings' looks like a ranking",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=listwise", "data.path={tmp}/bool_rank.jsonl"],
        "bool_rank.jsonl:1: column 'ranking' must be a list of integer ranks",
        1,
    ),
    (["data", "validate", "method=nope"], "unknown method 'nope'", 1),
    # Readers: lines are split at "\n" only; a quote left open is named where it opened; rows of a
    # JSON array are named by the line they start on.
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/u2028.jsonl"],
        "u2028.jsonl:2: column 'chosen' is empty",
        1,
    ),
    (["data", "validate", "method=dpo", "data.path={tmp}/u2028.jsonl"], "1 problem in", 1),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/badquote.csv"],
        'badquote.csv:3: unterminated quoted field (a " opened here is never closed',
        1,
    ),
    (
        ["train", "method=dpo", "data.path={tmp}/badquote.csv", "output_dir={tmp}/run"],
        'badquote.csv:3: unterminated quoted field (a " opened here is never closed',
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/wrapped.json"],
        "wrapped.json:8: column 'chosen' is empty",
        1,
    ),
    # data.columns.<ours>=<yours>: ours is a column the method's data reads, yours one the file has.
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/question.csv", "data.columns.promt=question"],
        "data.columns.promt=question: 'promt' is not a column of preference data (did you mean: prompt?); "
        "data.columns.<ours> takes one of chosen, conversations, history, human_ref_A, human_ref_B, input, "
        "instruction, labels, margin, non_preferred_output, preferred_output, prompt, rejected, system, tools",
        1,
    ),
    (
        ["train", "method=dpo", "data.path={tmp}/question.csv", "data.columns.prompt=questoin"],
        "data.columns.prompt=questoin: {tmp}/question.csv has no column 'questoin' (did you mean: question?); "
        "its columns: bad, good, question",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.path={tmp}/question.csv", "data.columns.prompt=question"],
        "columns found: bad, good, question (as prompt)",
        1,
    ),
    # The command line: non-ASCII values need quotes; a key given twice is refused.
    (
        ["train", "method=dpo", "data.system=你是助手"],
        "cannot parse 'data.system=你是助手': token recognition error at: '你'; a value with characters "
        """outside Hydra's unquoted set (non-ASCII letters among them) must be quoted, and the shell must """
        """pass the quotes on: 'data.system="你是助手"'""",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.columns.prompt=问题"],
        """'data.columns.prompt="问题"'""",
        1,
    ),
    (
        ["train", "method=dpo", "method=kto"],
        "method is given twice on the command line (method=dpo, then method=kto): keep one "
        "(to run each, sweep with -m method=dpo,kto)",
        1,
    ),
    (
        ["train", "-m", "method=dpo", "method.args.beta=0.1,0.2", "method.args.beta=0.3"],
        "method.args.beta is given twice on the command line (method.args.beta=0.1,0.2, then "
        "method.args.beta=0.3): keep one",
        1,
    ),
    (
        ["train", "method=dpo", "+seed=1", "seed=2", "--cfg", "job"],
        "seed is given twice on the command line (+seed=1, then seed=2)",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "~data.system", "data.system=x"],
        "data.system is given twice on the command line (~data.system, then data.system=x)",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.mode=foo"],
        "method.mode='foo' is not valid: use one of pairwise, pointwise, listwise",
        1,
    ),
    # Values checked before anything loads (issue 10, section 5).
    (["train", "method=dpo", "peft=lora", "peft.r=0"], "peft.r=0 must be at least 1", 1),
    (
        ["train", "method=dpo", "peft=lora", "peft.target_modules=[nosuch]"],
        "peft.target_modules: nosuch names no module of tiny; its projection layers: down_proj, gate_proj",
        1,
    ),
    (
        ["train", "method=grpo", "method.args.max_completion_length=0"],
        "method.args.max_completion_length=0 must be at least 1",
        1,
    ),
    (["train", "method=grpo", "method.args.temperature=0"], "method.args.temperature=0 must be positive", 1),
    (["train", "method=dpo", "method.args.beta=-1"], "method.args.beta=-1 must be positive", 1),
    (["data", "validate", "method=kto", "method.args.beta=0"], "method.args.beta=0 must be positive", 1),
    (
        ["train", "method=dpo", "model.name_or_path=${{nosuch.key}}"],
        "model.name_or_path=${{nosuch.key}} cannot be resolved: Interpolation key 'nosuch.key' not found",
        1,
    ),
    (
        ["data", "validate", "method=dpo", "data.system=${{oc.env:ALIGN_TEST_UNSET_VARIABLE}}"],
        "data.system=${{oc.env:ALIGN_TEST_UNSET_VARIABLE}} cannot be resolved: ",
        1,
    ),
    # /sys cannot be written, not even by root.
    (
        ["train", "method=sft", "output_dir=/sys/align-test-run"],
        "output_dir=/sys/align-test-run cannot be written",
        1,
    ),
    (
        ["train", "method=sft", "hydra.run.dir=/sys/align-test-run"],
        "hydra.run.dir=/sys/align-test-run cannot be written",
        1,
    ),
    (
        ["train", "method=ppo", "method.args.response_length=8"],
        "method.args.response_length is not a PPOConfig option (did you mean: max_new_tokens?",
        1,
    ),
    (
        ["data", "validate", "method=grpo", "+reward.timeout=-1"],
        "reward.timeout=-1 must be a number of seconds",
        1,
    ),
    # What only a method's build() used to find: validate finds it too (issue 10, section 4).
    (
        ["data", "validate", "method=grpo", "reward=match", "data.path={tmp}/noanswer.jsonl"],
        "reward.match reads the column 'answer', which the training data does not have",
        1,
    ),
    (
        ["data", "validate", "method=grpo", "data.path={tmp}/mixed.jsonl"],
        "mixed.jsonl:1: column 'answer' is a number here (56) but text in 3 other rows (first: ",
        1,
    ),
    (
        ["train", "method=ppo", "data.path={tmp}/mixed.jsonl", "output_dir={tmp}/run"],
        "mixed.jsonl:1: column 'answer' is a number here (56) but text in 3 other rows",
        1,
    ),
    (
        ["data", "validate", "method=rm", "method.normalize=zscore"],
        "method.normalize=zscore rescales pointwise scores; method.mode=pairwise has none",
        1,
    ),
    (
        ["data", "validate", "method=ppo", "method.critic_init=reward"],
        "method.critic_init=reward needs a reward model among the rewards",
        1,
    ),
]


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A folder with the bad files and a finished run; the cwd, so no run lands elsewhere."""
    for name, content in FILES.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(
            content, encoding="utf-8"
        )
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text(json.dumps({"method": "dpo", "metrics": {}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_inprocess(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        align(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,message,code", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_fails_with_its_message(argv, message, code, tmp, capsys):
    argv = [a.format(tmp=tmp) for a in argv]
    got, out, err = run_inprocess(argv, capsys)
    assert got == code, (out[-2000:], err[-2000:])
    assert message.format(tmp=tmp) in out + err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("align: error: "), err[-2000:]
    assert "Traceback" not in err
    if argv[0] == "train":
        assert len([line for line in err.splitlines() if line.startswith("align: error")]) == 1


def test_a_refused_run_leaves_no_run_folder(tmp, capsys):
    code, _, err = run_inprocess(["train", "method=dpo", "method.args.learning_rate=-1"], capsys)
    assert code == 1 and "learning_rate=-1" in err
    assert not (tmp / "outputs").exists() or not any((tmp / "outputs").rglob("*.yaml"))


def test_bitsandbytes_that_cannot_load_is_one_line(tmp, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    code, _, err = run_inprocess(
        ["train", "method=dpo", "peft=lora", "quant=4bit", f"output_dir={tmp}/run"], capsys
    )
    assert code == 1 and "quant=4bit/8bit needs bitsandbytes, which cannot be loaded here" in err
    assert not (tmp / "run" / "model.safetensors").exists()


def test_finished_run_folder_is_left_untouched(tmp, capsys):
    """Refused before Hydra starts, so not even the finished run's .hydra/ is rewritten."""
    hydra_dir = tmp / "done" / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text("original: true\n")
    code, _, err = run_inprocess(["train", "method=sft", f"hydra.run.dir={tmp}/done"], capsys)
    assert code == 1 and "holds a finished run" in err
    assert (hydra_dir / "config.yaml").read_text() == "original: true\n"
    assert sorted(p.name for p in (tmp / "done").iterdir()) == [".hydra", "summary.json"]


def subprocess_align(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "align_cli.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "method=dpo", "peft=qlora"], "unknown peft option 'qlora'"),
        (["train", "method=dpo", "model.nme_or_path=x"], "did you mean: name_or_path?"),
        (
            ["train", "method=kto", "data.path=kto_tag.jsonl"],
            "kto_tag.jsonl:1: column 'kto_tag' must be true or false",
        ),
    ],
)
def test_real_process_prints_one_line_and_no_traceback(args, message, tmp):
    out = subprocess_align(args, tmp)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("align: error: ") and message in out.stderr
    assert not (tmp / "outputs").exists() or not any((tmp / "outputs").rglob("*.safetensors"))


def test_debug_true_shows_the_traceback(tmp):
    out = subprocess_align(["train", "method=dpo", "model.nme_or_path=x", "debug=true"], tmp)
    assert out.returncode != 0 and "Traceback" in out.stderr and "nme_or_path" in out.stderr


def test_validate_lists_every_problem_and_summarizes(tmp, capsys):
    rows = [
        '{"instruction": "q1", "output": "a", "kto_tag": true}',
        '{"instruction": "q2", "output": "a", "kto_tag": "maybe"}',
        '{"instruction": "q3", "output": ',
        '{"instruction": "", "output": "b", "kto_tag": false}',
        '{"instruction": "q5", "output": "b", "kto_tag": false}',
    ]
    (tmp / "mixed.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, out, err = run_inprocess(["data", "validate", "method=kto", f"data.path={tmp}/mixed.jsonl"], capsys)
    assert code == 1 and "3 problems in" in err
    listed = [line.strip() for line in out.splitlines() if line.strip().startswith(str(tmp))]
    assert [line.split(":")[1] for line in listed] == ["2", "3", "4"]  # file order, each with its line
    assert "5 read, 2 valid" not in out and "4 read, 2 valid" in out  # the malformed line is not a row
    assert "format   alpaca_kto" in out and "labels   1 desirable (true), 1 undesirable (false)" in out


def test_validate_sample_passes_with_percentiles(tmp, capsys):
    code, out, _ = run_inprocess(["data", "validate", "method=dpo"], capsys)
    assert code == 0, out
    assert "108 read, 108 valid" in out and "format   alpaca_preference" in out
    header = next(line for line in out.splitlines() if "p50" in line)
    assert header.split()[-4:] == ["p50", "p90", "p99", "max"]
    for field in ("prompt", "chosen", "rejected"):
        cells = next(line for line in out.splitlines() if line.strip().startswith(field)).split()[1:]
        p50, p90, p99, top = map(int, cells)
        assert 0 < p50 <= p90 <= p99 <= top
    assert "align: ok: 108 rows of preference data (alpaca_preference), ready for method=dpo" in out
    # What data.eval_ratio=0.1 holds out, whole prompts at a time (2 rows each): as train does.
    assert "held out 10 of 108 rows (5 prompts, none also in training)" in out


def test_validate_checks_a_folders_evaluation_split(tmp, capsys):
    folder = tmp / "splits"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        rows = [json.dumps({"prompt": f"{split} {i}", "chosen": "a", "rejected": "b"}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, out, err = run_inprocess(
        ["data", "validate", "method=dpo", f"data.path={folder}", "data.eval_split=test"], capsys
    )
    assert code == 0, err
    assert "4 read, 4 valid" in out and "2 read, 2 valid" in out and "ok: 6 rows" in out
    code, out, err = run_inprocess(
        ["data", "validate", "method=dpo", f"data.path={folder}", "data.eval_split=dev"], capsys
    )
    assert code == 1 and f"data.eval_split=dev: {folder} has no split 'dev'; splits found: test, train" in out


def test_resuming_with_another_method_is_refused(tmp, capsys):
    """A checkpoint continues the run it belongs to: another method, model or data is an error."""
    run = tmp / "run"
    code, _, err = run_inprocess(
        ["train", "method=dpo", "method.args.max_steps=1", "method.args.save_steps=1", f"output_dir={run}"],
        capsys,
    )
    assert code == 0, err[-2000:]
    (run / "summary.json").unlink()  # as if it had stopped after its checkpoint
    code, _, err = run_inprocess(["train", "method=sft", "resume=true", f"output_dir={run}"], capsys)
    assert code == 1
    assert f"resume: {run} was trained with other settings (" in err and "method.name: dpo -> sft" in err
    assert "Traceback" not in err and not list(run.glob("checkpoint-*/adapter*"))
    assert "method=dpo" in (run / ".hydra" / "overrides.yaml").read_text()  # the run's record is intact


def test_quoted_non_ascii_values_compose(tmp, capsys):
    """Hydra's grammar takes any character inside quotes: the form the hint suggests works."""
    from align_cli.compose import compose_checked

    assert compose_checked(["method=dpo", 'data.system="你是助手"']).data.system == "你是助手"
    assert compose_checked(["method=dpo", "data.system='你是助手'"]).data.system == "你是助手"
    assert compose_checked(["method=dpo", '++data.columns.prompt="问题"']).data.columns.prompt == "问题"
    code, out, err = run_inprocess(["data", "validate", "method=dpo", 'data.system="你是助手"'], capsys)
    assert code == 0, err
    assert "ready for method=dpo" in out


@pytest.mark.parametrize(
    "overrides,repeated",
    [
        (["method=dpo", "method.args.beta=0.1,0.5"], None),  # a sweep is one override
        (["method=dpo", "+model.foo=1", "model.bar=2", "~data.system"], None),
        (["method=dpo", "++method.args.beta=1", "++method.args.beta=2"], "method.args.beta"),
        (["+seed=1", "++seed=2"], "seed"),
        (["~peft", "peft=lora"], "peft"),
    ],
)
def test_a_key_is_given_once(overrides, repeated):
    from align_cli.compose import check_repeated_keys

    if repeated is None:
        check_repeated_keys(overrides)
    else:
        with pytest.raises(AlignError, match=rf"^{repeated} is given twice on the command line"):
            check_repeated_keys(overrides)
