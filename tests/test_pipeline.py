"""`align pipeline`: stages wired into each other, continued after an interrupt, checked up front, gated.

One rlhf pipeline (SFT -> RM -> PPO, a few steps each, on data_samples/) is interrupted in its
PPO stage and continued; the tests read that pipeline folder: the PPO stage started from the
SFT policy (its reference holds the SFT weights), scored with and criticised by the RM folder;
the finished SFT and RM were kept, PPO resumed from its checkpoint. A changed stage config is
refused, a later stage's mistake is found before the first stage trains, a reward model that
ranks held-out pairs the wrong way round stops the pipeline at the gate, and a sweep runs
through the real `align pipeline` entry point (and continues when run again).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from transformers import TrainerCallback

from align_cli.config import CONF_DIR, SAMPLES_DIR
from align_cli.errors import AlignError, TrainingInterrupted
from align_cli.pipeline import run_pipeline
from align_cli.pipeline_plan import plan, recipe_names
from align_cli.pipeline_summary import SUMMARY_JSON

FAST = [
    "plot=false",
    "sft.method.args.max_steps=2",
    "sft.data.eval_ratio=0",
    "rm.method.args.max_steps=4",
    "rm.method.args.eval_strategy=no",  # one evaluation at the end: the gate's figure
    "ppo.method.args.max_steps=2",
    "ppo.method.args.save_steps=1",
    "ppo.method.args.per_device_train_batch_size=4",
    "ppo.method.args.num_mini_batches=1",
    "ppo.method.args.num_ppo_epochs=1",
    "ppo.method.args.max_new_tokens=4",
    "ppo.data.eval_ratio=0",
    "eval.max_prompts=8",
]


class SignalAt(TrainerCallback):
    """Sends SIGINT to this process during step `step`, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The rlhf pipeline, stopped by SIGINT in PPO's first step: (folder, message, mtimes)."""
    folder = tmp_path_factory.mktemp("pipe") / "rlhf"
    with pytest.raises(TrainingInterrupted) as err:
        run_pipeline(FAST, folder, callbacks={"ppo": [SignalAt(1)]})
    stamps = {s: os.stat(folder / s / "model.safetensors").st_mtime_ns for s in ("sft", "rm")}
    return folder, str(err.value), stamps, sorted(p.name for p in (folder / "ppo").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def finished(interrupted):
    """The same pipeline, continued by running the same overrides again."""
    folder = interrupted[0]
    return folder, run_pipeline(FAST, folder)


def test_an_interrupted_pipeline_continues_keeping_finished_stages(interrupted, finished):
    folder, message, stamps, checkpoints = interrupted
    assert "stage ppo: stopped by SIGINT at step 1" in message
    assert "continue the pipeline with: align pipeline plot=false" in message
    assert f"hydra.run.dir={folder}" in message
    assert checkpoints == ["checkpoint-1"]
    _, result = finished
    assert [(s.name, s.status) for s in result.stages] == [
        ("sft", "kept"),
        ("rm", "kept"),
        ("ppo", "resumed"),
    ]
    for stage, mtime in stamps.items():  # not trained again
        assert os.stat(folder / stage / "model.safetensors").st_mtime_ns == mtime
    steps = [json.loads(line)["step"] for line in (folder / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2] and result.stage("ppo").metrics["global_step"] == 2
    assert result.stage("ppo").run.trainer.state.global_step == 2


def test_the_ppo_stage_starts_from_sft_and_is_scored_and_criticised_by_rm(finished):
    from omegaconf import OmegaConf

    folder, result = finished
    cfg = OmegaConf.load(folder / "ppo" / ".hydra" / "config.yaml")
    assert cfg.model.name_or_path == str(folder / "sft")
    assert cfg.reward.model.path == str(folder / "rm")
    assert cfg.method.critic_init == "reward"  # the critic starts from that reward model
    # PPO-ptx's demonstrations are the SFT stage's data (here its sample file), every row of it.
    sft_cfg = OmegaConf.load(folder / "sft" / ".hydra" / "config.yaml")
    sft_data = str(SAMPLES_DIR / sft_cfg.method.sample)
    assert cfg.data.ptx_path == sft_data and cfg.method.args.ptx_coef > 0
    trainer = result.stage("ppo").run.trainer
    with open(sft_data, encoding="utf-8") as f:
        assert len(trainer.ptx_pairs) == sum(1 for line in f if line.strip())
    logged = [json.loads(line) for line in (folder / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ptx_loss"] > 0 for r in logged if "policy_loss" in r)
    assert [str(f.path) for f in trainer.reward_funcs] == [str(folder / "rm")]
    sft, ppo = weights(folder / "sft"), weights(folder / "ppo")
    from align_cli.modeling import build_tiny_model

    base = weights(build_tiny_model())
    assert any(not torch.equal(sft[n], base[n]) for n in sft), "SFT did not train"
    # The reference is the SFT policy, exactly; the policy moved away from it.
    for name, param in trainer.ref_model.named_parameters():
        torch.testing.assert_close(param.detach(), sft[name], msg=name)
    assert sum(not torch.equal(ppo[n], sft[n]) for n in sft) > len(sft) // 2, "PPO did not train"
    assert OmegaConf.load(folder / "rm" / ".hydra" / "config.yaml").model.name_or_path == "tiny"


def test_the_summary_names_each_stage_and_the_gate(finished):
    folder, _ = finished
    summary = json.loads((folder / SUMMARY_JSON).read_text())
    rm = json.loads((folder / "rm" / "summary.json").read_text())["metrics"]
    assert [s["name"] for s in summary["stages"]] == ["sft", "rm", "ppo"]
    assert summary["stages"][1]["metrics"]["eval_accuracy"] == rm["eval_accuracy"]
    assert "score" in summary["stages"][2]["metrics"] and "global_step" in summary["stages"][0]["metrics"]
    assert summary["gate"] == {
        "stage": "rm",
        "metric": "eval_accuracy",
        "value": rm["eval_accuracy"],
        "min_accuracy": 0.6,
        "passed": True,
    }
    markdown = (folder / "pipeline_summary.md").read_text()
    assert "| ppo | ppo | resumed |" in markdown and "Gate: rm eval_accuracy" in markdown
    # The policies side by side, scored by the pipeline's RM, against the SFT policy.
    evaluation = summary["evaluation"]
    assert evaluation["labels"] == ["start", "sft", "ppo"] and evaluation["reference"] == str(folder / "sft")
    by_label = dict(zip(evaluation["labels"], (m["metrics"] for m in evaluation["models"]), strict=True))
    assert by_label["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert by_label["ppo"]["kl_to_reference"] > 0 and by_label["start"]["kl_to_reference"] > 0
    assert all(isinstance(m["reward_greedy"], float) for m in by_label.values())
    assert "| ppo |" in markdown.split("## Evaluation")[1] and (folder / "eval" / "samples.jsonl").exists()


def test_a_changed_stage_config_is_refused_naming_the_difference(finished):
    folder, _ = finished
    before = os.stat(folder / "ppo" / "summary.json").st_mtime_ns
    with pytest.raises(
        AlignError, match=r"stage rm in .* \(rm\.method\.args\.learning_rate: 0\.001 -> 0\.5\)"
    ):
        run_pipeline([*FAST, "rm.method.args.learning_rate=0.5"], folder)
    with pytest.raises(AlignError, match=r"stage sft .*\(sft\.seed: 42 -> 7"):
        run_pipeline([*FAST, "seed=7"], folder)  # a shared key reaches every stage
    assert os.stat(folder / "ppo" / "summary.json").st_mtime_ns == before


def test_the_gate_stops_before_rl_when_the_reward_model_ranks_held_out_pairs_wrongly(tmp_path, finished):
    """Train pairs prefer the helpful answer, the held-out pairs the refusal: eval accuracy 0."""
    good, bad = "Sure, here is a clear and careful answer.", "No."
    train = [{"prompt": f"Question number {i}?", "chosen": good, "rejected": bad} for i in range(16)]
    held = [{"prompt": f"Another question {i}?", "chosen": bad, "rejected": good} for i in range(4)]
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "pipe"
    folder.mkdir()
    shutil.copytree(finished[0] / "sft", folder / "sft")  # same sft config: kept, not trained again
    rm_data = [f"rm.data.path={tmp_path / 'train.jsonl'}", f"rm.data.eval_path={tmp_path / 'held.jsonl'}"]
    with pytest.raises(AlignError) as err:
        run_pipeline([*FAST, *rm_data], folder)
    figure = json.loads((folder / "rm" / "summary.json").read_text())["metrics"]["eval_accuracy"]
    assert figure < 0.6
    assert f"held-out eval_accuracy is {figure:.4g}, below gate.min_accuracy=0.6: stopped before ppo" in str(
        err.value
    )
    assert not (folder / "ppo").exists()
    summary = json.loads((folder / SUMMARY_JSON).read_text())
    assert summary["state"] == "stopped at the gate" and summary["gate"]["passed"] is False


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "ppo.method.args.kl_coeff=0.1",
            r"stage ppo: method\.args\.kl_coeff is not a PPOConfig option \(did you mean: kl_coef",
        ),
        ("ppo.data.path={bad}", r"stage ppo: .*bad\.jsonl:2: .*prompt"),
        (
            "rm.data.eval_ratio=0",
            r"gate: stage rm holds out nothing for evaluation .*gate\.min_accuracy=null",
        ),
        ("gate.min_accuracy=2", r"gate\.min_accuracy=2 must be a number in \[-1, 1\]"),
        ("ppo.reward=nope", r"stage ppo: .*nope"),
        ("ppo.method.args.ptx_coef=-1", r"stage ppo: .*ptx_coef=-1 must not be negative"),
    ],
)
def test_a_mistake_in_a_later_stage_is_found_before_the_first_stage_trains(tmp_path, override, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Hi?", "input": ""}\n{"text": "no prompt here"}\n')
    folder = tmp_path / "pipe"
    with pytest.raises(AlignError, match=message):
        run_pipeline([*FAST, override.format(bad=bad)], folder)
    assert not (folder / "sft").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["foo.data.path=x"], "'foo' is not a stage of this recipe (stages: sft, rm, ppo"),
        (["recipe=dpo", "ppo.data.path=x"], "'ppo' is not a stage of this recipe (stages: sft, dpo"),
        (["recipe=rlfh"], "choose one of dpo, kto, rlhf, rlhf_grpo"),
        (
            ["data.path=x"],
            "data belongs to one stage: prefix the key with the stage's name (stages: sft, rm, ppo)",
        ),
        (["sft.method=dpo"], "the recipe fixes each stage's method"),
        (["sft.output_dir=x"], "the pipeline sets each stage's output_dir"),
    ],
)
def test_bad_command_lines_are_one_line_errors(tmp_path, capsys, argv, message):
    from align_cli.pipeline import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, f"hydra.run.dir={tmp_path / 'p'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "p").exists()


def test_every_recipe_opens_with_its_command_and_checks_clean():
    assert set(recipe_names()) == {"rlhf", "rlhf_grpo", "dpo", "kto"}
    assert (CONF_DIR / "pipeline.yaml").read_text().startswith("# align pipeline ")
    for name in recipe_names():
        assert (
            (CONF_DIR / "recipe" / f"{name}.yaml").read_text().startswith(f"# align pipeline recipe={name} ")
        )
        p = plan([f"recipe={name}"], None)
        assert p.stages[0].name == "sft" and p.stages[-1].inputs["policy"] == "sft"


def test_a_sweep_over_whole_pipelines_through_the_real_entry_point(tmp_path):
    align = shutil.which("align") or "align"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [
        align, "pipeline", "-m", "recipe=dpo", "plot=false",
        "sft.method.args.max_steps=1", "sft.data.eval_ratio=0",
        "dpo.method.args.max_steps=1", "dpo.data.eval_ratio=0", "dpo.method.args.beta=0.1,0.5",
        "eval.enabled=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from omegaconf import OmegaConf

    for job, beta in (("0", 0.1), ("1", 0.5)):
        folder = tmp_path / "sweep" / job
        assert (folder / "sft" / "summary.json").exists() and (folder / SUMMARY_JSON).exists()
        cfg = OmegaConf.load(folder / "dpo" / ".hydra" / "config.yaml")
        assert cfg.method.args.beta == beta and cfg.model.name_or_path == str(folder / "sft")
    # Continuing a job re-composes its stages from the same keys: the configs the entry stored match.
    job = [a for a in argv[3:] if not a.startswith(("hydra.sweep.dir", "dpo.method.args.beta"))]
    again = plan([*job, "dpo.method.args.beta=0.5"], tmp_path / "sweep" / "1")
    assert [s.status for s in again.stages] == ["finished", "finished"]


def test_ptx_data_is_the_sft_stages_data_unless_the_ppo_stage_names_its_own(tmp_path):
    demos = [str(SAMPLES_DIR / "sft_alpaca.jsonl"), str(SAMPLES_DIR / "harmless_sft.jsonl")]
    p = plan([f"sft.data.path=[{demos[0]},{demos[1]}]"], None)
    (ppo,) = [s for s in p.stages if s.name == "ppo"]
    assert list(ppo.cfg.data.ptx_path) == demos and ppo.cfg.method.args.ptx_coef > 0
    own = str(SAMPLES_DIR / "sft_alpaca.jsonl")
    p = plan([f"ppo.data.ptx_path={own}"], None)
    assert [s for s in p.stages if s.name == "ppo"][0].cfg.data.ptx_path == own


def test_the_ptx_wire_reads_the_sft_data_as_the_sft_stage_reads_it(tmp_path):
    from align_cli.config import DataConfig
    from align_cli.methods.ptx_data import read_ptx
    from align_cli.run_checks import typed

    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"Name colour {i}.", "reply": f"Colour {i} is blue."} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    p = plan(
        [f"sft.data.path={path}", "sft.data.columns.prompt=question", "sft.data.columns.completion=reply"],
        None,
    )
    (ppo,) = [s for s in p.stages if s.name == "ppo"]
    assert ppo.cfg.data.ptx_path == str(path)
    assert dict(ppo.cfg.data.ptx_columns) == {"prompt": "question", "completion": "reply"}
    assert dict(ppo.cfg.data.columns) == {}  # the PPO stage's own prompt file keeps its own reading
    loaded = read_ptx(typed(ppo.cfg, "data", DataConfig), conversational=False)
    assert [(r["prompt"], r["completion"]) for r in loaded.rows] == [
        (r["question"], r["reply"]) for r in rows
    ]


def test_stage_keys_reach_hydra_and_come_back_as_typed():
    from align_cli.pipeline_plan import decode, encode

    typed = [
        "recipe=rlhf",
        "peft=lora",
        "sft.data.path=a.jsonl",
        "+ppo.reward.extra.type=length",
        "gate.metric=x",
    ]
    encoded = encode(typed)
    assert encoded[2:4] == ["++sft.data.path=a.jsonl", "++ppo.reward.extra.type=length"]
    assert decode(encoded) == typed
    with pytest.raises(AlignError, match="cannot be deleted"):
        encode(["~ppo.reward.keyword"])


@pytest.mark.parametrize(
    "mode, metric",
    [("pairwise", "eval_accuracy"), ("listwise", "eval_kendall_tau"), ("pointwise", "eval_pearson")],
)
def test_the_gate_reads_the_figure_of_the_reward_models_mode(tmp_path, mode, metric):
    from align_cli.pipeline_summary import gate_result

    p = plan([f"rm.method.mode={mode}"], None)
    rm = p.stage("rm")
    rm.folder = str(tmp_path)
    figures = {"eval_accuracy": 0.9, "eval_kendall_tau": 0.55, "eval_pearson": 0.7}
    (tmp_path / "summary.json").write_text(json.dumps({"method": "rm", "metrics": figures}))
    result = gate_result(p.gate, rm)
    assert result["metric"] == metric and result["value"] == figures[metric]
    assert result["passed"] is (figures[metric] >= 0.6)
