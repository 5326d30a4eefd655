"""dist=ddp|fsdp|zero2|zero3: the composed trainer settings, the refusals, and FSDP2 on two CPU
processes (torchrun + gloo) for SFT, DPO and our PPO loop: sharded training, a saved model that
plain transformers loads, resuming from an FSDP checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align_cli.dist import DEEPSPEED_HINT, deepspeed_installed
from align_cli.errors import AlignError
from align_cli.run_checks import checked_config
from align_cli.testing import compose
from align_cli.train import train

REPO = Path(__file__).resolve().parents[1]
# A 2-process torchrun launch on this machine (gloo on a CPU); the script and its arguments follow.
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Each rank trains with the overrides given as JSON and reports whether FSDP was on, how many
# parameter elements it holds itself (its shard) and a checksum of the gathered full weights.
PROBE = """
import json, os, sys
from align_cli.testing import compose
from align_cli.train import train

r = train(compose(json.loads(sys.argv[2]), sys.argv[1]))
t = r.trainer
full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in t.model.named_parameters()}
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in t.model.parameters())
info = {"rank": int(os.environ["RANK"]), "fsdp": t.is_fsdp_enabled, "local": local,
        "total": sum(v.numel() for v in full.values()), "checksum": float(sum(v.double().sum() for v in full.values()))}
# A file per rank: two ranks printing to one pipe can interleave their lines.
with open(os.path.join(sys.argv[3], f"rank{info['rank']}.json"), "w") as f:
    json.dump(info, f)
"""


# How a script that trains under torchrun ends (align_cli.dist.end_rank): without it, a rank can
# abort in the interpreter's teardown after a finished run.
END_RANK = "\nfrom align_cli.dist import end_rank\nend_rank()\n"


def fsdp_on_two_ranks(tmp_path, overrides: list[str], script: str = PROBE) -> list[dict]:
    return on_two_ranks(tmp_path, ["dist=fsdp", *overrides], script)


def on_two_ranks(tmp_path, overrides: list[str], script: str) -> list[dict]:
    """`script` run by both ranks of a 2-process torchrun launch (gloo), with the overrides; each rank's report."""
    probe = tmp_path / "probe.py"
    probe.write_text(script + END_RANK)
    reports = tmp_path / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [*TORCHRUN_2, str(probe), str(tmp_path / "run"), json.dumps(overrides), str(reports)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    infos = [json.loads(path.read_text()) for path in sorted(reports.glob("rank*.json"))]
    assert sorted(i["rank"] for i in infos) == [0, 1]
    return infos


def fsdp_sharded(infos: list[dict]) -> None:
    assert all(i["fsdp"] for i in infos)
    assert all(i["local"] < i["total"] for i in infos)  # each rank holds a shard, not the model


def saved_matches_and_moved(run: Path, infos: list[dict]) -> None:
    """Both ranks held the same full weights; the saved model is those weights (plain
    transformers loads it) and differs from the tiny starting model."""
    import torch
    from transformers import AutoModelForCausalLM

    from align_cli.modeling import build_tiny_model

    assert infos[0]["checksum"] == pytest.approx(infos[1]["checksum"], rel=1e-9)
    saved = AutoModelForCausalLM.from_pretrained(run)
    start = AutoModelForCausalLM.from_pretrained(build_tiny_model())
    total = float(sum(p.double().sum() for p in saved.parameters()))
    assert total == pytest.approx(infos[0]["checksum"], rel=1e-6)
    moved = [
        n
        for (n, a), b in zip(saved.named_parameters(), start.parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert len(moved) > len(list(saved.parameters())) // 2


def test_fsdp_sft_on_two_cpu_processes_shards_trains_and_saves_a_loadable_model(tmp_path):
    # The default config, evaluation on: evaluation runs under FSDP too.
    infos = fsdp_on_two_ranks(tmp_path, ["method=sft", "method.args.max_steps=3"])
    fsdp_sharded(infos)
    saved_matches_and_moved(tmp_path / "run", infos)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval_loss" in summary["metrics"]
    # `align export` takes the FSDP run folder like any other: the same weights come out.
    from transformers import AutoModelForCausalLM

    from align_cli.export import main as export_main

    export_main([str(tmp_path / "run"), str(tmp_path / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    total = float(sum(p.double().sum() for p in exported.parameters()))
    assert total == pytest.approx(infos[0]["checksum"], rel=1e-6)


def test_fsdp_dpo_on_two_cpu_processes_and_resume_from_its_checkpoint(tmp_path):
    from align_cli.guard import checkpoint_problem

    args = [
        "method=dpo",
        "data.eval_ratio=0",
        "method.args.save_steps=2",
        "dist.activation_checkpointing=true",
    ]
    fsdp_on_two_ranks(tmp_path, [*args, "method.args.max_steps=2"])
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert checkpoint_problem(checkpoint) is None
    # As if killed after its checkpoint: the finished model and summary gone, then resumed to step 4.
    for name in ("summary.json", "model.safetensors", "config.json"):
        (run / name).unlink()
    infos = fsdp_on_two_ranks(tmp_path, [*args, "method.args.max_steps=4", "resume=true"])
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][:4] == [1, 2, 3, 4]
    fsdp_sharded(infos)
    saved_matches_and_moved(run, infos)


# PPO's own loop: each rank reports how much of policy, critic and reference it holds, a checksum
# of the policy's gathered weights and how many forward passes its policy ran. Rank 0 samples at
# most 2 new tokens, rank 1 up to 8: rank 0's responses stop first at every rollout.
PPO_PROBE = """
import json, os, sys
import align_cli.ppo.experience as experience
from align_cli.ppo.models import unwrap_peft
from align_cli.ppo.sharding import local_and_total_numel
from align_cli.testing import compose
from align_cli.train import train

rank, forwards = int(os.environ["RANK"]), [0]
made = experience.ExperienceMaker.__init__

def init(self, *args, **kwargs):
    made(self, *args, **kwargs)
    if rank == 0:
        self.generation_config.max_new_tokens = 2
    unwrap_peft(self.policy).register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

experience.ExperienceMaker.__init__ = init
t = train(compose(json.loads(sys.argv[2]), sys.argv[1])).trainer
full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in t.policy.parameters()]
info = {"rank": rank, "fsdp": t.is_fsdp_enabled, "forwards": forwards[0],
        "held": {name: local_and_total_numel(m) for name, m in
                 (("policy", t.policy), ("critic", t.critic), ("reference", t.ref_model)) if m is not None},
        "checksum": float(sum(p.detach().double().sum() for p in full))}
earlier = os.path.join(sys.argv[1], "checkpoint-2")
if t.state.global_step > 2 and os.path.isdir(earlier):
    # What a stop on collapse does after training: an earlier checkpoint loaded into the shards.
    from align_cli.compat import load_checkpoint

    load_checkpoint(t, earlier)
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in t.policy.parameters()]
    info["restored"] = float(sum(p.detach().double().sum() for p in full))
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump(info, f)
"""

PPO_SHORT = [
    "method=ppo",
    "method.args.per_device_train_batch_size=4",
    "method.args.num_mini_batches=1",
    "method.args.max_new_tokens=8",
    "plot=false",
]


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def ppo_sharded_on_two_ranks(infos: list[dict], roles: tuple[str, ...]) -> None:
    """Every role sharded (each rank holds part of it), the same full policy on both ranks, and
    the ranks ran the same forward passes although rank 0's responses always stopped first."""
    assert all(i["fsdp"] for i in infos)
    for role in roles:
        held = [i["held"][role] for i in infos]
        assert all(local < total for local, total in held), (role, held)
        assert sum(local for local, _ in held) >= held[0][1]  # together, the whole model
    assert sorted(infos[0]["held"]) == sorted(roles)
    assert infos[0]["checksum"] == pytest.approx(infos[1]["checksum"], rel=1e-9)
    assert infos[0]["forwards"] == infos[1]["forwards"] > 0


def test_fsdp_ppo_with_ptx_on_two_cpu_processes_shards_saves_a_loadable_model_and_resumes_exactly(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align_cli.guard import checkpoint_problem
    from align_cli.modeling import build_tiny_model

    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n" for i in range(6))
    )
    # One eval prompt: rank 1 has none, yet must sample beside rank 0 (the sharded policy).
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "Say something kind."}) + "\n")
    # A constant learning rate: a run resumed at step 2 must then end where the whole run ended.
    args = [
        *PPO_SHORT,
        "method.args.max_steps=3",
        "method.args.save_steps=2",
        "method.args.lr_scheduler_type=constant",
    ]
    args += [f"data.ptx_path={demos}", "method.args.ptx_coef=0.5", f"data.eval_path={eval_file}"]
    infos = fsdp_on_two_ranks(tmp_path, args, PPO_PROBE)
    ppo_sharded_on_two_ranks(infos, ("policy", "critic", "reference"))
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if "policy_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ptx_loss"]) for r in train_rows)
    assert any("eval_score" in r for r in logged)  # evaluation sampled from the sharded policy too
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(row["prompt"] == "Say something kind." for row in samples)
    assert len({row["step"] for row in samples}) == len(samples)  # one row per evaluation, written once
    # The run folder: a plain model that transformers loads, the same weights as the ranks held,
    # moved from the start; the checkpoint's critic loads as the value model it is.
    start = AutoModelForCausalLM.from_pretrained(build_tiny_model())
    saved = AutoModelForCausalLM.from_pretrained(run)
    assert checksum(saved) == pytest.approx(infos[0]["checksum"], rel=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(saved.parameters(), start.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2
    checkpoint = run / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    # The optimizer in accelerate's FSDP file; the weights once (not again in pytorch_model_fsdp.bin).
    assert (checkpoint / "optimizer.bin").is_file() and not list(checkpoint.glob("pytorch_model_fsdp*"))
    critic = AutoModelForSequenceClassification.from_pretrained(checkpoint / "critic")
    assert critic.config.num_labels == 1 and float(critic.score.weight.abs().sum()) > 0  # trained from V = 0
    # checkpoint-2 loaded back into the sharded policy after training: its weights on both ranks.
    at_step_2 = checksum(AutoModelForCausalLM.from_pretrained(checkpoint))
    assert at_step_2 != pytest.approx(infos[0]["checksum"], rel=1e-6)
    assert [i["restored"] for i in infos] == pytest.approx([at_step_2, at_step_2], rel=1e-6)
    # As if killed right after checkpoint-2: what came later is gone; resumed, the run ends on the
    # same weights (optimizer, scheduler, RNG and KL state all restored under FSDP).
    shutil.rmtree(run / "checkpoint-3")
    for name in ("summary.json", "model.safetensors", "config.json"):
        (run / name).unlink()
    whole_run = infos[0]["forwards"]
    infos = fsdp_on_two_ranks(tmp_path, [*args, "resume=true"], PPO_PROBE)
    ppo_sharded_on_two_ranks(infos, ("policy", "critic", "reference"))
    assert infos[0]["forwards"] < whole_run / 2  # it sampled step 3 only, not the run again
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({s for s in steps if s is not None}) == [1, 2, 3]
    assert checksum(AutoModelForCausalLM.from_pretrained(run)) == pytest.approx(checksum(saved), rel=1e-9)


def test_fsdp_ppo_with_lora_on_two_cpu_processes_trains_and_saves_the_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align_cli.modeling import build_tiny_model

    overrides = [*PPO_SHORT, "peft=lora", "method.args.max_steps=1", "data.eval_ratio=0"]
    infos = fsdp_on_two_ranks(tmp_path, overrides, PPO_PROBE)
    # No reference copy: the reference is the sharded policy with its adapter off.
    ppo_sharded_on_two_ranks(infos, ("policy", "critic"))
    run = tmp_path / "run"
    adapter = load_file(run / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and not any("lora" not in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # moved from B = 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(build_tiny_model()), run)
    assert model.peft_config["default"].r > 0


def test_tiny_model_built_first_by_a_rank_other_than_0_is_complete(tmp_path):
    """Under torchrun, transformers' save_pretrained writes weights on rank 0 only: the tiny model
    built by rank 1 into a fresh cache must still hold them."""
    script = tmp_path / "build.py"
    script.write_text(
        "import os, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "from align_cli.modeling import build_tiny_model\n"
        "if dist.get_rank() == 1:\n"
        "    print(sorted(os.listdir(build_tiny_model())))\n"
        "dist.barrier()\n" + END_RANK
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "ALIGN_CACHE": str(tmp_path / "cache"),
    }
    out = subprocess.run([*TORCHRUN_2, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'config.json'" in out.stdout and "'model.safetensors'" in out.stdout, out.stdout


@pytest.mark.parametrize("activation", [False, True])
@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "rm", "grpo"])
def test_fsdp_trainer_settings_compose_without_a_launch(method, activation):
    _, ctx, _ = checked_config(
        compose([f"method={method}", "dist=fsdp", f"dist.activation_checkpointing={activation}"])
    )
    args = ctx.config
    assert args.fsdp is True
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]  # read from the model
    plugin = args.fsdp_plugin_args  # what transformers hands accelerate's FullyShardedDataParallelPlugin
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["activation_checkpointing"] is activation
    assert not getattr(args, "activation_checkpointing", False)  # FSDP's own checkpointing, not both


def test_ddp_adds_no_trainer_settings():
    _, ctx, _ = checked_config(compose(["method=dpo"]))
    assert ctx.dist.name == "ddp"
    assert not ctx.config.fsdp and ctx.config.fsdp_plugin_args is None and ctx.config.deepspeed is None


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_settings_name_the_shipped_deepspeed_config(stage):
    from align_cli.config import DistConfig, ModelConfig
    from align_cli.dist import training_args

    out = training_args(DistConfig(name=f"zero{stage}", activation_checkpointing=True), ModelConfig())
    assert out["activation_checkpointing"] is True
    config = json.loads(Path(out["deepspeed"]).read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # transformers fills it from method.args
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_file_is_checked(tmp_path):
    from align_cli.config import DistConfig
    from align_cli.dist import deepspeed_config

    with pytest.raises(AlignError, match="no such file"):
        deepspeed_config(DistConfig(name="zero2", config=str(tmp_path / "none.json")))
    wrong = tmp_path / "z.json"
    wrong.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(AlignError, match="stage is 2, dist=zero3 wants 3"):
        deepspeed_config(DistConfig(name="zero3", config=str(wrong)))


@pytest.mark.skipif(deepspeed_installed(), reason="DeepSpeed is installed here")
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_without_deepspeed_names_the_extra(name):
    with pytest.raises(AlignError) as err:
        checked_config(compose(["method=sft", f"dist={name}"]))
    assert str(err.value) == f"dist={name} needs DeepSpeed, which is not installed: {DEEPSPEED_HINT}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=dpo", "dist=fsdp", "peft=lora", "quant=4bit"],
            "quant=4bit with dist=fsdp is not supported",
        ),
        (["method=sft", "+method.args.fsdp=full_shard"], "method.args.fsdp is set by dist="),
        (["method=sft", "+method.args.deepspeed=ds.json"], "method.args.deepspeed is set by dist="),
        (["method=sft", "dist=fsdp", "dist.config=x.json"], "applies to dist=zero2|zero3, not dist=fsdp"),
        (["method=sft", "dist=fsdpp"], "Could not find 'dist/fsdpp'"),
        (
            ["method=sft", "dist=fsdp", "+method.args.activation_checkpointing=true"],
            "use dist.activation_checkpointing=true",
        ),
    ],
)
def test_dist_refusals(overrides, message):
    with pytest.raises(Exception) as err:
        checked_config(compose(overrides))
    assert message in str(err.value)


def test_fsdp_on_one_cpu_process_is_refused_not_silently_ddp(tmp_path):
    with pytest.raises(
        AlignError, match=r"dist=fsdp needs a distributed launch: torchrun --nproc_per_node N"
    ):
        train(compose(["method=sft", "dist=fsdp"], tmp_path / "run"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_dist_refusal_through_the_align_entry_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(
        [sys.executable, "-m", "align_cli", "train", "method=ppo", "dist=fsdp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dist=fsdp needs a distributed launch: torchrun" in lines[0], out.stderr


def gpu_check(*options: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out


def test_gpu_check_dry_run_lists_every_option_and_each_command_composes():
    out = gpu_check("--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    pairs = []
    for line in lines:
        words = line.split()
        overrides = words[words.index("train") + 1 :]
        values = dict(w.split("=", 1) for w in overrides if "=" in w)
        pairs.append((values["method"], values["dist"]))
        # The same overrides on the tiny model, composed and checked as `align train` does.
        kept = [w for w in overrides if "=" in w and not w.startswith(("model.name_or_path=", "output_dir="))]
        refusal = None
        if values["dist"].startswith("zero") and not deepspeed_installed():
            refusal = "needs DeepSpeed"
        if refusal:
            with pytest.raises(AlignError, match=refusal):
                checked_config(compose(kept))
        else:
            _, ctx, _ = checked_config(compose(kept))
            assert ctx.dist.name == values["dist"]
    assert pairs == [(m, d) for m in ("sft", "dpo", "ppo") for d in ("ddp", "fsdp", "zero2", "zero3")]


def test_gpu_check_writes_its_table(tmp_path):
    table = tmp_path / "check.md"
    # One process, one step: the table, not the options (tests/test_deepspeed.py runs ZeRO).
    out = gpu_check("--cpu", "--nproc", "1", "--only", "sft:ddp", "--out", str(table), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = table.read_text()
    assert "- device: CPU" in text and "- date: " in text
    assert "| sft | ddp | pass |" in text


@pytest.mark.parametrize(
    "world, settings, message",
    [
        ("2", {"name": "fsdp"}, None),
        ("1", {"name": "fsdp"}, "dist=fsdp on a CPU needs 2 or more processes"),
        ("2", {"name": "fsdp", "cpu_offload": True}, "dist.cpu_offload moves parameters off the GPU"),
        ("2", {"name": "zero3"}, None),
        ("1", {"name": "zero2"}, "dist=zero2 on a CPU needs 2 or more processes"),
        ("2", {"name": "ddp"}, None),
    ],
)
def test_launch_checks_on_a_cpu(monkeypatch, world, settings, message):
    import torch

    from align_cli.config import DistConfig
    from align_cli.dist import launch_problem

    if torch.cuda.is_available():
        pytest.skip("the CPU-only launch checks")
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    problem = launch_problem(DistConfig(**settings))
    assert problem == message if message is None else message in problem


def test_fsdp_activation_checkpointing_defaults_as_ddp_does():
    """null: on with a GPU (as the methods' default under ddp), off on a CPU."""
    import torch

    _, ctx, _ = checked_config(compose(["method=sft", "dist=fsdp"]))
    assert ctx.dist.activation_checkpointing is None
    assert ctx.config.fsdp_plugin_args["activation_checkpointing"] is torch.cuda.is_available()


END_RANK_SCRIPT = """
import atexit, sys, threading, time
import torch, torch.distributed as dist
from align_cli.dist import end_rank

out = sys.argv[1]
if sys.argv[2] == "group":
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
atexit.register(lambda: open(f"{out}/atexit", "w").write("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), open(f"{out}/thread", "w").write("done"))).start()
sys.stdout.write("buffered")  # a pipe: block-buffered, not yet written
end_rank(3)
print(" returned")
"""


@pytest.mark.parametrize("group", [True, False])
def test_end_rank_leaves_after_the_teardown_steps_only_from_a_rank_with_a_process_group(tmp_path, group):
    """A rank with a process group leaves with the code given, after its threads, its atexit
    handlers and its buffered output; anywhere else end_rank returns and Python exits as usual."""
    script = tmp_path / "end.py"
    script.write_text(END_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    mode = "group" if group else "none"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    if group:
        assert out.returncode == 3 and out.stdout == "buffered", out.stderr[-2000:]
    else:
        assert out.returncode == 0 and out.stdout == "buffered returned\n", out.stderr[-2000:]
