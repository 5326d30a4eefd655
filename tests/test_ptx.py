"""PPO-ptx (InstructGPT's pretraining mix, align_cli/ppo/ptx.py): the demonstrations are laid out as
rollouts are, their language-model loss trains the policy beside the PPO loss, and its settings
are checked before anything loads (by `align train` and `align data validate` alike)."""

from __future__ import annotations

import json

import pytest

from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train
from align_cli.validate import validate

SHORT = [
    "method.args.per_device_train_batch_size=4",
    "method.args.num_mini_batches=1",
    "method.args.num_ppo_epochs=2",
    "method.args.max_new_tokens=8",
    "data.eval_ratio=0",
    "plot=false",
]


def demos(tmp_path, rows=None):
    path = tmp_path / "demos.jsonl"
    rows = rows or [
        {"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}, clearly."}
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_demonstrations_are_laid_out_as_rollouts():
    """Left-padded prompt, then the completion; the mask covers the completion's tokens only."""
    from datasets import Dataset

    from align_cli.config import ModelConfig
    from align_cli.modeling import load_tokenizer
    from align_cli.ppo.ptx import ptx_batch, tokenize_demonstrations

    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    chat = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
            {"prompt": [{"role": "user", "content": "a longer question"}], "completion": [{"role": "assistant", "content": "ok"}]},
        ]
    )  # fmt: skip
    pairs = tokenize_demonstrations(tok, chat)
    for (prompt, completion), row in zip(pairs, chat, strict=True):
        head = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert tok.decode(prompt) == head
        assert tok.decode(completion).startswith(row["completion"][0]["content"])
    plain = tokenize_demonstrations(tok, Dataset.from_list([{"prompt": "2+2=", "completion": " 4"}]))
    assert plain[0][1][-1] == tok.eos_token_id and tok.decode(plain[0][1][:-1]) == " 4"

    batch = ptx_batch(pairs, [0, 1], tok.pad_token_id, max_length=None)
    seq, mask, comp = batch["sequences"], batch["attention_mask"], batch["completion_mask"]
    width_c = comp.shape[1]
    for i, (prompt, completion) in enumerate(pairs):
        real = seq[i][mask[i].bool()].tolist()
        assert real == prompt + completion
        assert seq[i, -width_c:][comp[i].bool()].tolist() == completion
        assert mask[i, : seq.shape[1] - width_c].tolist()[-len(prompt) :] == [1] * len(prompt)  # left-padded
    cut = ptx_batch(pairs, [1], tok.pad_token_id, max_length=6)
    assert int(cut["attention_mask"].sum()) <= 6


GRPO_SHORT = [
    "method.args.per_device_train_batch_size=4",
    "method.args.num_generations=2",
    "method.args.max_completion_length=8",
    "data.eval_ratio=0",
    "plot=false",
]


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_the_ptx_loss_trains_the_policy_on_the_demonstrations(tmp_path, method):
    """The policy's loss on the demonstrations, logged every step, falls fast at a high learning
    rate (the RL loss on a length reward moves it little); with ptx_coef=0 none is computed."""
    path = demos(tmp_path)
    overrides = [
        f"method={method}",
        "reward=length",
        *(SHORT if method == "ppo" else GRPO_SHORT),
        "method.args.max_steps=6",
        "method.args.learning_rate=1e-2",
    ]
    result = train(
        compose([*overrides, f"data.ptx_path={path}", "method.args.ptx_coef=1.0"], tmp_path / "on")
    )
    assert len(result.trainer.ptx_pairs) == 8
    logged = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ptx_loss"] for r in logged if "ptx_loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.75 * losses[0], losses
    train(compose(overrides, tmp_path / "off"))
    logged = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("ptx_loss" in r for r in logged)


def test_grpo_ptx_weighs_a_step_the_same_however_it_is_split_into_micro_batches(tmp_path, monkeypatch):
    """method.args.ptx_batch_size is ptx rows per optimiser step for GRPO, as for PPO: one step of
    4 rows in one micro-batch and the same 4 rows in two micro-batches of 2 move the weights alike,
    with demonstrations of different lengths (each part weighs by its share of the step's tokens).
    A constant reward leaves GRPO's own loss without a gradient, so the step is the ptx loss's
    alone (plain SGD: the update is the gradient); each micro-batch's share is weighted so that
    gradient accumulation does not multiply ptx_coef."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "flat_reward.py").write_text(
        "def flat(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = demos(
        tmp_path,
        [
            {"instruction": f"Count to {i}.", "input": "", "output": " ".join(["one"] * (1 + 3 * i))}
            for i in range(8)
        ],
    )
    base = [
        "method=grpo",
        "reward=function",
        "reward.function.path=flat_reward:flat",
        *GRPO_SHORT,
        "method.args.max_steps=1",
        "method.args.optim=sgd",
        "method.args.learning_rate=0.5",
        "method.args.weight_decay=0",
        "method.args.max_grad_norm=0",
        f"data.ptx_path={path}",
        "method.args.ptx_coef=1.0",
        "method.args.ptx_batch_size=4",
    ]
    moved, drawn = {}, {}
    for name, split in (("one", ["method.args.per_device_train_batch_size=4"]),
                        ("two", ["method.args.per_device_train_batch_size=2", "method.args.gradient_accumulation_steps=2"])):  # fmt: skip
        trainer = train(compose([*base, *split], tmp_path / name)).trainer
        assert trainer.args.gradient_accumulation_steps == (1 if name == "one" else 2)
        assert [len(p) for p in trainer._ptx_parts] == ([4] if name == "one" else [2, 2])
        drawn[name] = sum(trainer._ptx_parts, [])
        start = AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path).state_dict()
        moved[name] = {k: v.detach() - start[k] for k, v in trainer.model.state_dict().items()}
        assert len({len(c) for _, c in trainer.ptx_pairs}) == 8  # lengths differ: token shares matter
    assert drawn["one"] == drawn["two"]  # the same rows: drawn per step, then shared out
    # Fewer ptx rows than micro-batches: one micro-batch has none, the other trains on the row.
    few = train(
        compose(
            [*base, "method.args.per_device_train_batch_size=2", "method.args.gradient_accumulation_steps=2",
             "method.args.ptx_batch_size=1"],
            tmp_path / "few",
        )
    ).trainer  # fmt: skip
    assert [len(p) for p in few._ptx_parts] == [0, 1]
    logged = [json.loads(line) for line in (tmp_path / "few" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("ptx_loss", 0) > 0 for r in logged)
    norm = sum(float(d.norm()) for d in moved["one"].values())
    assert norm > 1e-3  # the ptx loss moved the weights
    diff = sum(float((moved["one"][k] - moved["two"][k]).norm()) for k in moved["one"])
    assert diff < 1e-4 * norm, (diff, norm)


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_the_ptx_data_is_read_once_per_run(tmp_path, monkeypatch, method):
    """The check before loading reads data.ptx_path (every bad row named) and the trainer trains
    on those rows: the file is not read a second time (a large SFT set would cost its load twice)."""
    from align_cli.data import convert

    path = demos(tmp_path)
    reads = []
    read = convert.read_and_convert

    def counted(data_cfg, *args, **kwargs):
        if str(data_cfg.path) == str(path):
            reads.append(args)
        return read(data_cfg, *args, **kwargs)

    monkeypatch.setattr(convert, "read_and_convert", counted)
    overrides = [f"method={method}", "reward=length", *(SHORT if method == "ppo" else GRPO_SHORT)]
    result = train(
        compose(
            [*overrides, "method.args.max_steps=1", f"data.ptx_path={path}", "method.args.ptx_coef=1.0"],
            tmp_path / "run",
        )
    )
    assert len(reads) == 1 and len(result.trainer.ptx_pairs) == 8


def test_ptx_settings_are_checked_before_loading(tmp_path, caplog):
    path = demos(tmp_path)
    base = ["method=ppo", "reward=length", *SHORT, "method.args.max_steps=1"]

    def check(*overrides):
        return train(compose([*base, *overrides], tmp_path / f"r{len(list(tmp_path.iterdir()))}"))

    with pytest.raises(AlignError, match=r"method\.args\.ptx_coef=1\.0 .* give them with data\.ptx_path="):
        check("method.args.ptx_coef=1.0")
    with pytest.raises(AlignError, match=r"ptx_coef=-1 must not be negative"):
        check("method.args.ptx_coef=-1", f"data.ptx_path={path}")
    with pytest.raises(
        AlignError,
        match=r"data\.ptx_path belongs to the ptx loss.s data \(ppo and grpo\): method=dpo reads none",
    ):
        train(compose(["method=dpo", f"data.ptx_path={path}", "method.args.max_steps=1"], tmp_path / "dpo"))
    bad = demos(tmp_path, [{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": 3}])
    with pytest.raises(AlignError, match=r"data\.ptx_path: .*demos\.jsonl:2"):
        check("method.args.ptx_coef=1.0", f"data.ptx_path={bad}")
    report = validate(compose([*base, "method.args.ptx_coef=1.0", f"data.ptx_path={bad}"], tmp_path / "v"))
    assert any("data.ptx_path" in p and "demos.jsonl:2" in p for p in report.settings), report.settings
    with caplog.at_level("WARNING", logger="align"):
        check(f"data.ptx_path={path}")
    assert "data.ptx_path is set but method.args.ptx_coef is 0" in caplog.text
    with pytest.raises(
        AlignError, match=r"data\.ptx_columns says how data\.ptx_path is read, but data\.ptx_path is not set"
    ):
        check("data.ptx_columns.prompt=question")
    with pytest.raises(AlignError, match=r"data\.ptx_format belongs to the ptx loss.s data .*method=dpo"):
        train(compose(["method=dpo", "data.ptx_format=alpaca", "method.args.max_steps=1"], tmp_path / "dpo2"))


def test_ptx_data_in_its_own_layout_is_read_with_data_ptx_columns(tmp_path):
    from align_cli.methods.ptx_data import read_ptx

    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus one?", "reply": f"It is {i + 1}."} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = compose(
        [
            "method=ppo",
            f"data.ptx_path={path}",
            "data.ptx_columns.prompt=question",
            "data.ptx_columns.completion=reply",
        ],
        tmp_path / "r",
    )
    from align_cli.config import DataConfig
    from align_cli.run_checks import typed

    loaded = read_ptx(typed(cfg, "data", DataConfig), conversational=False)
    assert [(r["prompt"], r["completion"]) for r in loaded.rows] == [
        (r["question"], r["reply"]) for r in rows
    ]
    with pytest.raises(AlignError, match=r"data\.ptx_columns\.completion=replyy: .*has no column 'replyy'"):
        train(
            compose(
                [
                    "method=ppo",
                    "reward=length",
                    "method.args.ptx_coef=1",
                    f"data.ptx_path={path}",
                    "data.ptx_columns.prompt=question",
                    "data.ptx_columns.completion=replyy",
                ],
                tmp_path / "bad",
            )
        )
