"""dist=zero2|zero3 (DeepSpeed ZeRO) on two CPU processes (torchrun + gloo): SFT and DPO through
transformers' `deepspeed=`, and our PPO loop as one DeepSpeed engine, whose runs end on the same
weights as under ddp. Skipped without DeepSpeed (`make install` installs it)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_dist import PPO_SHORT, checksum, on_two_ranks, saved_matches_and_moved

from align_cli.dist import deepspeed_installed

# Under DeepSpeed each rank reports the ZeRO stage, how many processes accelerate counts, its
# batches per epoch, the parameter elements it holds (ZeRO-3: its partition) and a checksum of
# the full weights (ZeRO-3: gathered).
DS_PROBE = """
import json, os, sys
from contextlib import nullcontext
import deepspeed
from align_cli.testing import compose
from align_cli.train import train

t = train(compose(json.loads(sys.argv[2]), sys.argv[1])).trainer
params = list(t.model.parameters())
zero3 = all(hasattr(p, "ds_tensor") for p in params)
with deepspeed.zero.GatheredParameters(params) if zero3 else nullcontext():
    checksum = float(sum(p.detach().double().sum() for p in params))
info = {"rank": int(os.environ["RANK"]), "deepspeed": t.is_deepspeed_enabled,
        "stage": t.model_wrapped.zero_optimization_stage(), "processes": t.accelerator.num_processes,
        "batches": len(t.get_train_dataloader()),
        "local": sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params),
        "total": sum(p.ds_numel if zero3 else p.numel() for p in params), "checksum": checksum}
with open(os.path.join(sys.argv[3], f"rank{info['rank']}.json"), "w") as f:
    json.dump(info, f)
"""

needs_deepspeed = pytest.mark.skipif(not deepspeed_installed(), reason="pip install 'align-cli[deepspeed]'")


def zero_ran(infos: list[dict], stage: int) -> None:
    """Both ranks ran DeepSpeed ZeRO at `stage` as two processes (each reading half the batches)
    and hold the same full weights; under ZeRO-3 each holds a partition of them."""
    assert all(i["deepspeed"] and i["stage"] == stage and i["processes"] == 2 for i in infos)
    assert infos[0]["batches"] == infos[1]["batches"]
    assert infos[0]["checksum"] == pytest.approx(infos[1]["checksum"], rel=1e-9)
    if stage == 3:
        assert all(i["local"] < i["total"] for i in infos)
        assert sum(i["local"] for i in infos) >= infos[0]["total"]


@needs_deepspeed
def test_zero3_sft_on_two_cpu_processes_partitions_trains_and_saves_a_loadable_model(tmp_path):
    # The default config, evaluation on.
    infos = on_two_ranks(tmp_path, ["method=sft", "method.args.max_steps=3", "dist=zero3"], DS_PROBE)
    zero_ran(infos, 3)
    saved_matches_and_moved(tmp_path / "run", infos)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval_loss" in summary["metrics"]


@needs_deepspeed
def test_zero2_dpo_on_two_cpu_processes_partitions_the_optimizer_and_resumes_from_its_checkpoint(tmp_path):
    from align_cli.guard import checkpoint_problem

    args = ["method=dpo", "dist=zero2", "data.eval_ratio=0", "method.args.save_steps=2"]
    on_two_ranks(tmp_path, [*args, "method.args.max_steps=2"], DS_PROBE)
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    # DeepSpeed's checkpoint: one optimizer partition per rank.
    parts = sorted(p.name for p in (checkpoint / "global_step2").glob("*optim_states.pt"))
    assert len(parts) == 2 and "rank_0" in parts[0] and "rank_1" in parts[1]
    assert checkpoint_problem(checkpoint) is None
    for name in ("summary.json", "model.safetensors", "config.json"):
        (run / name).unlink()
    infos = on_two_ranks(tmp_path, [*args, "method.args.max_steps=4", "resume=true"], DS_PROBE)
    zero_ran(infos, 2)
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][:4] == [1, 2, 3, 4]
    saved_matches_and_moved(run, infos)


# PPO under DeepSpeed: each rank reports the ZeRO stage, checksums of its policy and critic
# (ZeRO-3: gathered) and how much of each it holds.
PPO_DS_PROBE = """
import json, os, sys
from contextlib import nullcontext
import deepspeed
from align_cli.ppo.sharding import local_and_total_numel, zero3_params
from align_cli.testing import compose
from align_cli.train import train

t = train(compose(json.loads(sys.argv[2]), sys.argv[1])).trainer
info = {"rank": int(os.environ["RANK"]), "deepspeed": t.is_deepspeed_enabled,
        "stage": t.model_wrapped.zero_optimization_stage() if t.is_deepspeed_enabled else None}
for name, model in (("policy", t.policy), ("critic", t.critic)):
    partitioned = zero3_params(model)
    with deepspeed.zero.GatheredParameters(partitioned) if partitioned else nullcontext():
        info[name] = float(sum(p.detach().double().sum() for p in model.parameters()))
    info[name + "_held"] = local_and_total_numel(model)
with open(os.path.join(sys.argv[3], f"rank{info['rank']}.json"), "w") as f:
    json.dump(info, f)
"""


@needs_deepspeed
def test_ppo_under_zero3_trains_as_ddp_does_and_resumes_exactly(tmp_path, rm_run_folder):
    """ZeRO-3 partitions the parameters, gradients and optimizer state, not the arithmetic: the
    same PPO-ptx run with a reward model ends on the same weights under ddp and zero3 (zero2
    runs the same engine code without partitioned parameters: checked by hand, equal to 1e-7;
    docs/dist_check_cpu.md runs it). Under ZeRO-3 the policy and critic load partitioned (the critic's new
    head zeroed through a gather), generation gathers the policy, the reference and the reward
    model are whole on each rank, the saves gather the full weights, and resuming from a ZeRO-3
    checkpoint (the engine's partitions) ends where the uninterrupted run ended."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align_cli.modeling import build_tiny_model

    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n" for i in range(6))
    )
    # Evaluation off: under ZeRO-3 it runs the ranks in lockstep (filler rows drawn from the
    # sampler), so runs with it compare with each other, not with ddp's.
    args = [
        *PPO_SHORT,
        "method.args.max_steps=2",
        "method.args.save_steps=1",
        "method.args.num_ppo_epochs=2",
        "method.args.lr_scheduler_type=constant",
        f"data.ptx_path={demos}",
        "method.args.ptx_coef=0.5",
        "reward=model",
        f"reward.model.path={rm_run_folder}",
        "data.eval_ratio=0",
    ]
    runs = {}
    for dist in ("ddp", "zero3"):
        (tmp_path / dist).mkdir()
        runs[dist] = on_two_ranks(tmp_path / dist, [*args, f"dist={dist}"], PPO_DS_PROBE)
    assert not runs["ddp"][0]["deepspeed"]
    infos = runs["zero3"]
    assert all(i["deepspeed"] and i["stage"] == 3 for i in infos)
    for role in ("policy", "critic"):
        assert infos[0][role] == pytest.approx(infos[1][role], rel=1e-12)
        assert infos[0][role] == pytest.approx(runs["ddp"][0][role], rel=1e-6), role
        held = [i[role + "_held"] for i in infos]  # each rank holds half, together the whole
        assert all(local < total for local, total in held) and sum(h[0] for h in held) >= held[0][1]
    start = AutoModelForCausalLM.from_pretrained(build_tiny_model())
    assert checksum(start) != pytest.approx(runs["ddp"][0]["policy"], rel=1e-6)  # it trained
    run = tmp_path / "zero3" / "run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["ptx_loss"]) for r in rows)
    assert checksum(AutoModelForCausalLM.from_pretrained(run)) == pytest.approx(
        runs["zero3"][0]["policy"], rel=1e-6
    )
    checkpoint = run / "checkpoint-1"
    assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2  # one partition per rank
    critic = AutoModelForSequenceClassification.from_pretrained(checkpoint / "critic")
    assert float(critic.score.weight.abs().sum()) > 0  # gathered, not a rank's empty placeholder
    shutil.rmtree(run / "checkpoint-2")
    for name in ("summary.json", "model.safetensors", "config.json"):
        (run / name).unlink()
    resumed = on_two_ranks(tmp_path / "zero3", [*args, "dist=zero3", "resume=true"], PPO_DS_PROBE)
    for role in ("policy", "critic"):
        assert resumed[0][role] == pytest.approx(runs["zero3"][0][role], rel=1e-12)
