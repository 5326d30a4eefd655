"""`align export`, `align generate`, `align chat` and the model cards, through the real entry point.

The run folders are trained once per module (a few steps on the tiny model) and shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from align_cli.testing import compose
from align_cli.train import train


def align(*args, stdin: str | None = None, check: bool = True):
    # One thread: on a shared 2-core machine, torch's threads fight each other in generate().
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "align_cli", *map(str, args)],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def main(*args, capsys=None) -> tuple[int, str, str]:
    """`align ...` in this process (the same entry as the console script): exit code, stdout, stderr."""
    from align_cli.cli import main as align_main

    try:
        align_main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def _train(folder, overrides):
    cfg = compose(
        [*overrides, "method.args.logging_steps=1", "method.args.save_steps=1000"], output_dir=folder
    )
    return train(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders: SFT full and LoRA, a LoRA reward model, a QLoRA SFT run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    fast = ["method.args.max_steps=3", "method.args.learning_rate=0.05", "data.eval_ratio=0"]
    lora = ["peft=lora", "peft.r=4", "peft.dropout=0"]
    out = {}
    for name, overrides in {
        "sft": ["method=sft", *fast],
        "sft_lora": ["method=sft", *lora, *fast],
        "rm_lora": ["method=rm", *lora, *fast],
        "sft_qlora": ["method=sft", *lora, "quant=4bit", *fast],
    }.items():
        _train(root / name, overrides)
        out[name] = root / name
    return out


def _logits(model, tokenizer, texts=("Hello there", "水的沸点是多少?")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def _base(run) -> str:
    return json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]


# --- export -------------------------------------------------------------------------------------


def test_export_lora_is_a_plain_model_with_the_adapter_models_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = runs["sft_lora"], tmp_path / "merged"
    result = align("export", run, out)
    assert "merged the LoRA adapter" in result.stdout
    names = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    assert not names & {"metrics.jsonl", "summary.json", "training_args.bin"}

    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(_base(run)).eval()
    base_logits = _logits(base, tokenizer)
    adapter = PeftModel.from_pretrained(base, run).eval()  # unmerged: base + B @ A at every layer
    expected, got = _logits(adapter, tokenizer), _logits(exported, tokenizer)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got - base_logits).abs().max() > 1e-3, "the export equals the base: the adapter was not merged"
    card = (out / "README.md").read_text()
    assert "merged the LoRA adapter" in card and "## The run it comes from" in card and "[None]" not in card


def test_export_qlora_dequantizes_the_base_then_merges(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, out = runs["sft_qlora"], tmp_path / "merged"
    code, stdout, err = main("export", run, out, "dtype=float32", capsys=capsys)
    assert code == 0 and "4-bit base dequantized first" in stdout, err
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.float32
    # The weights the adapter was trained against: the base quantized as in training, dequantized.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        _base(run), quantization_config=quant, dtype=torch.float32
    )
    reference = PeftModel.from_pretrained(quantized.dequantize(dtype=torch.float32), run).eval()
    expected, got = _logits(reference, tokenizer), _logits(exported, tokenizer)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # Merging into the unquantized base instead would give other weights.
    naive = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(_base(run)), run
    ).merge_and_unload()
    name = "model.layers.0.mlp.down_proj.weight"
    assert (exported.state_dict()[name] - naive.state_dict()[name]).abs().max() > 1e-3


def test_export_reward_model_is_a_one_output_classifier(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, out = runs["rm_lora"], tmp_path / "rm"
    code, stdout, err = main("export", run, out, capsys=capsys)
    assert code == 0 and "reward model (one-output sequence classifier)" in stdout, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no num_labels needed
    base = AutoModelForSequenceClassification.from_pretrained(_base(run), num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    reference = PeftModel.from_pretrained(base, run).eval()
    got, expected = _logits(exported, tokenizer), _logits(reference, tokenizer)
    assert got.shape == (2, 1) and torch.allclose(got, expected, atol=1e-5), (got, expected)
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "reward:" in ran.stdout, ran.stderr[-2000:]


def test_export_full_model_is_copied_with_a_note(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = runs["sft"], tmp_path / "full"
    code, stdout, _ = main("export", run, out, capsys=capsys)
    assert code == 0 and "already holds a full model: copied" in stdout

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(out / "model.safetensors") == digest(run / "model.safetensors")
    assert not {"metrics.jsonl", "summary.json", "checkpoint-3", ".hydra"} & set(os.listdir(out))
    # Another dtype is a real conversion, said as such; here in shards.
    half = tmp_path / "bf16"
    code, stdout, _ = main("export", run, half, "dtype=bfloat16", "max_shard_size=300KB", capsys=capsys)
    assert code == 0 and "re-saved it in bfloat16" in stdout
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert (half / "model.safetensors.index.json").exists() and len(
        list(half.glob("model-*.safetensors"))
    ) > 1
    tokenizer = AutoTokenizer.from_pretrained(half)
    original = AutoModelForCausalLM.from_pretrained(run, dtype=torch.bfloat16).eval()
    loaded = AutoModelForCausalLM.from_pretrained(half).eval()
    assert loaded.dtype == torch.bfloat16 and torch.equal(
        _logits(loaded, tokenizer), _logits(original, tokenizer)
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["{run}", "{tmp}/x", "dtype=float8"],
            "dtype=float8 is not valid: use auto, float32, bfloat16, float16",
        ),
        (["{run}", "{tmp}/x", "dtyp=float32"], "'dtyp' is not an option (did you mean: dtype?)"),
        (["{tmp}", "{tmp}/x"], "is not a run folder or model folder"),
        (["{run}", "{run}/.hydra"], "already exists and is not empty"),
        (["{run}"], "missing argument: align export <run folder> <out dir>"),
    ],
)
def test_export_errors_are_one_line(runs, tmp_path, args, message, capsys):
    args = [a.format(run=runs["sft"], tmp=tmp_path) for a in args]
    code, _, err = main("export", *args, capsys=capsys)
    assert code == 1 and message in err and err.startswith("align: error: "), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# --- generate -----------------------------------------------------------------------------------


def _prompts(path, n=5):
    rows = [{"id": i, "instruction": f"Say {i}.", "input": "" if i % 2 else "please"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def test_generate_keeps_input_columns_and_matches_greedy_decoding(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out.jsonl"
    result = align(
        "generate",
        runs["sft"],
        f"data.path={tmp_path / 'p.jsonl'}",
        f"output={out}",
        "temperature=0",
        "max_new_tokens=6",
        "batch_size=2",
        "data.system=Be brief.",
    )
    assert f"wrote 5 rows (5 in all) to {out}" in result.stdout and "generate: 100%" in result.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: w[k] for k in r} for w, r in zip(written, rows, strict=True)] == rows
    assert all(isinstance(w["completion"], str) for w in written)
    # Row 0 (batched, left-padded) is the model's own greedy answer to the templated prompt.
    tokenizer = AutoTokenizer.from_pretrained(runs["sft"])
    model = AutoModelForCausalLM.from_pretrained(runs["sft"]).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say 0.\nplease"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    greedy = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert written[0]["completion"] == tokenizer.decode(
        greedy[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_generate_resumes_and_samples_several_answers(runs, tmp_path, capsys):
    _prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out.jsonl"
    common = [
        "generate",
        runs["sft_lora"],
        f"data.path={tmp_path / 'p.jsonl'}",
        f"output={out}",
        "max_new_tokens=4",
    ]
    code, _, err = main(*common, "num_return_sequences=3", "batch_size=4", capsys=capsys)
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(line)["completions"]) == 3 for line in lines)
    # A run killed after two rows and in the middle of writing the third.
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15], encoding="utf-8")
    code, stdout, _ = main(*common, "num_return_sequences=3", capsys=capsys)
    assert code == 0 and "resuming" in stdout and "at row 3 of 6" in stdout
    again = out.read_text().splitlines()
    assert (
        again[:2] == lines[:2]
        and len(again) == 6
        and all(json.loads(line)["id"] == i for i, line in enumerate(again))
    )
    code, stdout, _ = main(*common, capsys=capsys)
    assert code == 0 and "already holds all 6 rows" in stdout
    # Another prompts file is not "resumed" into this output.
    (tmp_path / "other.jsonl").write_text('{"prompt": "Hi"}\n', encoding="utf-8")
    code, _, err = main(
        "generate", runs["sft_lora"], f"data.path={tmp_path / 'other.jsonl'}", f"output={out}", capsys=capsys
    )
    assert code == 1 and "holds 6 rows, more than the 1 input rows" in err
    _prompts(tmp_path / "changed.jsonl", 6)
    (tmp_path / "changed.jsonl").write_text(
        (tmp_path / "changed.jsonl").read_text().replace("Say 1.", "Say one.")
    )
    code, _, err = main(
        "generate",
        runs["sft_lora"],
        f"data.path={tmp_path / 'changed.jsonl'}",
        f"output={out}",
        capsys=capsys,
    )
    assert code == 1 and f"{out}:2 does not match input row 2" in err


def test_generate_reads_grpo_message_prompts_and_names_bad_rows(runs, tmp_path, capsys):
    data = tmp_path / "msgs.jsonl"
    data.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "What is 6 plus 9?"}], "answer": "15"})
        + "\n"
        + json.dumps({"prompt": "How many legs does a spider have?", "answer": "8"})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "o.jsonl"
    code, _, err = main(
        "generate", runs["sft"], f"data.path={data}", f"output={out}", "max_new_tokens=3", capsys=capsys
    )
    assert code == 0, err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["answer"] for w in written] == ["15", "8"] and written[0]["prompt"][0]["role"] == "user"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n', encoding="utf-8")
    code, _, err = main(
        "generate", runs["sft"], f"data.path={bad}", f"output={tmp_path / 'b.jsonl'}", capsys=capsys
    )
    assert code == 1 and f"{bad}:2" in err and "prompt" in err and not (tmp_path / "b.jsonl").exists()
    code, _, err = main("generate", runs["sft"], f"output={out}", capsys=capsys)
    assert code == 1 and "data.path is not set" in err
    code, _, err = main("generate", runs["sft"], "data.pth=x", capsys=capsys)
    assert code == 1 and "'data.pth' is not an option (did you mean: data.path," in err
    code, _, err = main(
        "generate",
        runs["sft"],
        f"data.path={data}",
        "output=x.jsonl",
        "num_return_sequences=2",
        "temperature=0",
        capsys=capsys,
    )
    assert code == 1 and "with temperature=0 would give one greedy answer several times" in err
    code, _, err = main(
        "generate", runs["sft"], f"data.path={data}", f"output={tmp_path / 'l.jsonl'}", "model.max_length=12",
        "max_new_tokens=4", capsys=capsys,
    )  # fmt: skip
    assert code == 1 and "2 prompts are longer than 12 - max_new_tokens=4 = 8 tokens (first: row 1" in err


def test_chat_drops_the_oldest_exchanges_that_no_longer_fit(runs, capsys):
    from align_cli import serve
    from align_cli.config import ModelConfig

    opts = serve.ChatOptions(
        model=ModelConfig(name_or_path=str(runs["sft"])), system="Be brief.", max_new_tokens=4, temperature=0
    )
    tokenizer, model = serve.load_for_generation(opts.model)
    chat = serve.Chat(tokenizer, model, opts, max_length=60)
    for text in ("first question here", "second question here", "third question here"):
        chat.answer(text)
    assert chat.history[0] == {"role": "system", "content": "Be brief."}
    assert chat.history[-2] == {"role": "user", "content": "third question here"}
    assert "first question here" not in str(chat.history)  # dropped to fit 60 - 4 tokens
    assert len(serve.prompt_ids(tokenizer, chat.history[:-1])) <= 56
    assert "dropped the 1 oldest exchange(s)" in capsys.readouterr().err
    chat.reset()
    assert chat.history == [{"role": "system", "content": "Be brief."}]


# --- chat -----------------------------------------------------------------------------------------


def test_chat_streams_answers_with_history_reset_and_exit(runs):
    """Piped stdin: one user turn per line. The answers are what plain transformers samples for the
    same conversations with the same seed: history kept, then cleared by /reset; /exit stops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

    run = runs["sft"]
    turns = "Hello!\nWhat did I say?\n/rest\n/reset\n\nStart again.\n/exit\nNever answered.\n"
    result = align(
        "chat", run, "system=You are terse.", "temperature=1.0", "max_new_tokens=8", "seed=7", stdin=turns
    )
    assert "(history cleared)" in result.stderr and "(unknown command /rest: /reset clears" in result.stderr

    tokenizer = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    config = GenerationConfig(
        max_new_tokens=8,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(7)
    system = {"role": "system", "content": "You are terse."}
    history, expected = [system], []
    for text in ("Hello!", "What did I say?", None, "Start again."):
        if text is None:
            history = [system]
            continue
        history.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, generation_config=config)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer})
        expected.append(answer + "\n")
    assert result.stdout == "".join(expected)


def test_chat_refuses_a_reward_model_and_bad_keys(runs, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = main("chat", runs["rm_lora"], capsys=capsys)
    assert code == 1 and "is a reward model" in err and not out
    code, _, err = main("chat", runs["sft"], "temprature=0", capsys=capsys)
    assert code == 1 and "'temprature' is not an option (did you mean: temperature?)" in err
    code, _, err = main("chat", runs["sft"], "top_p=0", capsys=capsys)
    assert code == 1 and "top_p=0.0 must be in (0, 1]" in err
    code, _, err = main("chat", capsys=capsys)
    assert code == 1 and "missing argument: align chat <run folder|model>" in err


# --- model cards ---------------------------------------------------------------------------------


def test_run_card_is_ours_and_its_snippet_runs(runs):
    run = runs["sft_lora"]
    card = (run / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "fine-tuned version of [None]" not in card and 'model="None"' not in card
    assert "`tiny`" in card and "supervised fine-tuning" in card and "LoRA r=4" in card
    assert "| train | `" in card and "sft_alpaca.jsonl` | 54 |" in card
    assert f"| `loss_last_step` | {summary['loss_last_step']:.4g} |" in card
    assert "align train method=sft model.name_or_path=tiny peft=lora peft.r=4" in card
    assert "method.args.max_steps=3" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_reward_model_run_card_loads_the_lora_classifier(runs):
    card = (runs["rm_lora"] / "README.md").read_text()
    assert (
        "A reward model trained from `tiny` with reward modelling" in card and "| `mode` | pairwise |" in card
    )
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "reward:" in ran.stdout, ran.stderr[-2000:]


def test_options_are_typed_and_checked_like_overrides():
    from align_cli import generate, options
    from align_cli.errors import AlignError

    opts = options.parse(
        generate.GenerateOptions,
        [
            "temperature=0",
            "data.path=p.jsonl",
            "data.columns.prompt=question",
            "model.dtype=bfloat16",
            "batch_size=3",
        ],
        "align generate",
        generate.GENERATE_UNUSED,
    )
    assert (opts.temperature, opts.batch_size, opts.model.dtype) == (0.0, 3, "bfloat16")
    assert opts.data.columns == {"prompt": "question"} and opts.data.path == "p.jsonl"
    for bad, message in [
        (["batch_size=two"], "batch_size: Value 'two' of type 'str' could not be converted to Integer"),
        (["max_new_tokens"], "'max_new_tokens' is not key=value"),
        (["data.eval_ratio=0.1"], "data.eval_ratio is for training"),
        (["num_return_sequence=2"], "(did you mean: num_return_sequences?)"),
    ]:
        with pytest.raises(AlignError) as err:
            options.parse(generate.GenerateOptions, bad, "align generate", generate.GENERATE_UNUSED)
        assert message in str(err.value) and "\n" not in str(err.value)
