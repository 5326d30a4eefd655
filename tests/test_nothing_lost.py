"""Nothing lost, nothing silently wrong (issue 10, sections 5 and 6).

- A run folder is held by one run at a time (a lock a crashed run does not leave stuck).
- Checkpoints: the newest complete one is resumed (damaged ones are skipped, and said);
  resuming the final checkpoint trains no further step; metadata is written atomically.
- Damaged weights, pickled weights, a full disk, another run's checkpoint: one line each.
- Rewards that return NaN/inf, call sys.exit or hang stop the run naming the reward.
- Ctrl-C while the data is prepared is never swallowed; KTO's `seed` changes the run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from align_cli.errors import AlignError
from align_cli.testing import compose
from align_cli.train import train

ROOT = Path(__file__).resolve().parents[1]
SFT = ["method=sft", "data.eval_ratio=0", "plot=false", "method.args.per_device_train_batch_size=32"]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def checkpointed_run(tmp_path: Path, steps: int = 3, extra: list[str] | None = None) -> Path:
    """A finished SFT run with a checkpoint at every step, its summary removed (as if it died at the end)."""
    run = tmp_path / "run"
    overrides = [
        *SFT,
        f"method.args.max_steps={steps}",
        "method.args.save_steps=1",
        "method.args.save_total_limit=5",
    ]
    train(compose([*overrides, *(extra or [])], run))
    (run / "summary.json").unlink()
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 3-step run with checkpoints 1-3, trained once for the checkpoint tests (which copy it)."""
    return checkpointed_run(tmp_path_factory.mktemp("trained"), steps=3)


@pytest.fixture
def run3(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# --- the run folder lock ------------------------------------------------------------------


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder as an `align` run does, and keeps it until killed."""
    code = f"from align_cli.run_folder import lock_run_folder; import time; lock_run_folder({str(folder)!r}); print('ok', flush=True); time.sleep(120)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ok"
    return proc


def test_a_second_run_into_a_held_folder_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
    from align_cli.preflight import prepare
    from align_cli.run_folder import unlock_run_folder

    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(
            AlignError, match=rf"hydra.run.dir={run} is in use by another align run \(pid {holder.pid} on "
        ):
            prepare(["method=dpo", f"hydra.run.dir={run}"])
        with pytest.raises(AlignError, match=rf"output_dir={run} is in use by another align run"):
            train(compose([*SFT, "method.args.max_steps=1"], run))
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The lock file is still there, with the dead process's pid: it no longer holds the folder.
    assert f"pid {holder.pid}" in (run / ".align.lock").read_text()
    prepare(["method=dpo", f"hydra.run.dir={run}"])
    unlock_run_folder(str(run))


# --- checkpoints --------------------------------------------------------------------------


def test_resuming_the_final_checkpoint_trains_no_further_step(run3):
    from safetensors.torch import load_file

    expected = load_file(run3 / "model.safetensors")  # what the uninterrupted run ended with
    (run3 / "model.safetensors").unlink()  # killed while saving the final model
    resumed = train(
        compose([*SFT, "method.args.max_steps=3", "method.args.save_steps=1", "resume=true"], run3)
    )
    assert resumed.trainer.state.global_step == 3
    assert not (run3 / "checkpoint-4").exists()
    got = load_file(run3 / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], t) for n, t in expected.items())
    assert json.loads((run3 / "summary.json").read_text())["metrics"]["global_step"] == 3


@pytest.mark.parametrize(
    "damage,why",
    [
        (
            lambda c: (c / "trainer_state.json").write_text('{"global_step": 3, "log_hi'),
            "trainer_state.json is damaged",
        ),
        (lambda c: (c / "model.safetensors").unlink(), "no model or adapter weights"),
        (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
        (
            lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:5000]),
            ".*model.safetensors is .* bytes, but its header describes",
        ),
    ],
    ids=["truncated-state", "no-weights", "no-optimizer", "truncated-weights"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_complete_one(run3, capsys, damage, why):
    run = run3
    damage(run / "checkpoint-3")
    from align_cli.guard import find_checkpoint

    assert find_checkpoint(True, str(run)) == str(run / "checkpoint-2")
    err = capsys.readouterr().err
    assert "checkpoint-3 is incomplete (" in err and "resuming from checkpoint-2" in err
    assert __import__("re").search(why, err), err
    # Named directly, it is refused with the reason and the one to use instead.
    with pytest.raises(
        AlignError, match=rf"checkpoint-3: this checkpoint is incomplete \({why}.*resume from .*checkpoint-2"
    ):
        find_checkpoint(str(run / "checkpoint-3"), str(run))


def test_resume_continues_past_a_damaged_checkpoint_to_max_steps(run3, capsys):
    run = run3
    (run / "checkpoint-3" / "trainer_state.json").write_text("{")
    resumed = train(
        compose([*SFT, "method.args.max_steps=3", "method.args.save_steps=1", "resume=true"], run)
    )
    assert resumed.trainer.state.global_step == 3
    assert "resuming from checkpoint-2" in capsys.readouterr().err


def test_a_ppo_checkpoint_needs_its_kl_state_and_critic(run3):
    from align_cli.guard import checkpoint_problem

    ckpt = run3 / "checkpoint-1"
    assert checkpoint_problem(ckpt) is None
    shutil.copytree(ckpt, ckpt / "critic", ignore=shutil.ignore_patterns("critic"))
    assert "ppo_state.json" in checkpoint_problem(ckpt)
    (ckpt / "ppo_state.json").write_text(json.dumps({"kl_controller": {"value": 0.1}}))
    assert checkpoint_problem(ckpt) is None
    (ckpt / "critic" / "model.safetensors").unlink()
    assert checkpoint_problem(ckpt) == "no critic weights in critic/"


def test_checkpoint_metadata_is_replaced_atomically(tmp_path, monkeypatch):
    from transformers import TrainerState

    from align_cli.compat import install_atomic_trainer_state
    from align_cli.guard import write_json_atomic

    install_atomic_trainer_state()
    path = tmp_path / "trainer_state.json"
    TrainerState(global_step=1).save_to_json(str(path))
    assert json.loads(path.read_text())["global_step"] == 1

    def killed(*args):  # the process dies between writing the new file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        TrainerState(global_step=2).save_to_json(str(path))
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(tmp_path / "ppo_state.json", {"kl_controller": {}})
    assert json.loads(path.read_text())["global_step"] == 1  # the old state, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json"]  # no temp files left


def test_a_checkpoint_of_another_kind_or_run_is_refused(tmp_path, capsys):
    from omegaconf import OmegaConf

    from align_cli.cli import main as align

    lora = checkpointed_run(tmp_path, steps=1, extra=["peft=lora", "peft.r=4"])
    # As `align train` leaves it: the settings it was composed with.
    (lora / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose([*SFT, "peft=lora", "peft.r=4"]), lora / ".hydra" / "config.yaml")
    with pytest.raises(
        AlignError, match=r"holds a LoRA adapter, but this run trains the full model \(peft=none\)"
    ):
        train(compose([*SFT, f"resume={lora / 'checkpoint-1'}"], tmp_path / "new"))
    # Through the command line, another run's settings are compared, shown resolved.
    with pytest.raises(SystemExit):
        align(["train", "method=dpo", f"resume={lora / 'checkpoint-1'}", f"output_dir={tmp_path / 'other'}"])
    err = capsys.readouterr().err
    assert f"resume: {lora} was trained with other settings (" in err and "method.name: sft -> dpo" in err


def test_a_refused_resume_shows_resolved_values(tmp_path, capsys):
    """kto resuming an rm run: rm's dataset type, which follows its mode (null in the saved config),
    is shown as its value."""
    from align_cli.cli import main as align

    run = tmp_path / "rm"
    for argv in (
        [
            "train",
            "method=rm",
            "method.args.max_steps=1",
            "method.args.save_steps=1",
            "data.eval_ratio=0",
            f"output_dir={run}",
        ],
        ["train", "method=kto", "resume=true", f"output_dir={run}"],
    ):
        try:
            align(argv)
        except SystemExit as exit_:
            assert exit_.code == 1
        (run / "summary.json").unlink(missing_ok=True)
    err = capsys.readouterr().err
    assert "was trained with other settings" in err and "method.dataset_type: preference -> kto" in err
    assert "${" not in err


def test_a_run_saved_before_a_key_existed_resumes_without_a_difference(tmp_path, capsys):
    """A key a later align added (here data.ptx_*) is missing from an older run's saved config;
    at its default it reads the run as it was made, so resume neither refuses nor warns."""
    from omegaconf import OmegaConf

    from align_cli.cli import main as align
    from align_cli.preflight import config_differences

    run = tmp_path / "sft"
    args = ["train", "method=sft", "method.args.max_steps=1", "method.args.save_steps=1", "data.eval_ratio=0"]
    align([*args, f"output_dir={run}"])
    saved = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved)
    for key in ("ptx_format", "ptx_columns", "ptx_subset", "ptx_split", "ptx_dataset"):
        del cfg.data[key]
    OmegaConf.save(cfg, saved)
    (run / "summary.json").unlink()
    capsys.readouterr()
    align([*args, "resume=true", f"output_dir={run}"])
    err = capsys.readouterr().err
    assert "ptx" not in err and "differ" not in err, err
    assert (run / "summary.json").exists()
    # Given another value than its default, the same missing key is a difference.
    assert config_differences({"data": {"path": "a"}}, {"data": {"path": "a", "ptx_format": "alpaca"}}) == [
        "data.ptx_format: <unset> -> alpaca"
    ]
    assert config_differences({"data": {"path": "a"}}, {"data": {"path": "b", "ptx_format": "auto"}}) == [
        "data.path: a -> b"
    ]


# --- weights, disks -----------------------------------------------------------------------


def tiny_copy(tmp_path: Path) -> Path:
    from align_cli.modeling import build_tiny_model

    folder = tmp_path / "model"
    shutil.copytree(build_tiny_model(), folder)
    return folder


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda f: f.write_bytes(f.read_bytes()[:4000]),
            "model.safetensors is 4000 bytes, but its header describes",
        ),
        (
            lambda f: f.write_bytes(b"<html>not a model</html>" * 10),
            "model.safetensors is not a readable safetensors file",
        ),
    ],
    ids=["truncated", "garbage"],
)
def test_damaged_model_weights_are_one_line_before_anything_loads(tmp_path, damage, message):
    model = tiny_copy(tmp_path)
    damage(model / "model.safetensors")
    with pytest.raises(AlignError, match=message):
        train(compose([*SFT, f"model.name_or_path={model}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_pickled_weights_refused_by_weights_only_are_one_line(tmp_path):
    from safetensors.torch import load_file

    model = tiny_copy(tmp_path)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    state["extra"] = argparse.Namespace(note="any object")  # torch's weights_only loader refuses it
    torch.save(state, model / "pytorch_model.bin")
    with pytest.raises(
        AlignError, match=r"its pickled weights \(.bin\) hold more than tensors.*weights_only=True"
    ):
        train(compose([*SFT, "method.args.max_steps=1", f"model.name_or_path={model}"], tmp_path / "run"))


def test_a_full_disk_is_one_line_before_and_during_training(tmp_path, monkeypatch):
    import align_cli.train as train_module

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(
        AlignError, match=r"only 10 MiB free on its disk, and one checkpoint of this run needs at least"
    ):
        train(compose([*SFT, "method.args.max_steps=1"], tmp_path / "run"))
    monkeypatch.setattr(shutil, "disk_usage", real)

    save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(AlignError) as info:
        train(compose([*SFT, "method.args.max_steps=2", "method.args.save_steps=1"], tmp_path / "run2"))
    message = str(info.value)
    assert "checkpoint-1/optimizer.pt: No space left on device" in message and "resume=true" in message
    assert "no checkpoint was completed" in message
    assert train_module  # the module under test


# --- rewards ------------------------------------------------------------------------------


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(
        textwrap.dedent(
            """
            import math, os, signal, sys, time

            def all_nan(prompts, completions, **kwargs):
                return [math.nan] * len(completions)

            def some_inf(prompts, completions, **kwargs):
                return [math.inf] + [1.0] * (len(completions) - 1)

            def exits(prompts, completions, **kwargs):
                sys.exit(3)

            def hangs(prompts, completions, **kwargs):
                time.sleep(30)

            CALLS = []

            def stop_during_call(prompts, completions, **kwargs):
                CALLS.append(1)
                if len(CALLS) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the reward is running
                    time.sleep(0.5)
                return [float(len(c)) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield
    sys.modules.pop("bad_rewards", None)


def one(name: str, timeout=None):
    from align_cli.rewards import build_reward_functions

    cfg = {"function": {"path": f"bad_rewards:{name}"}}
    if timeout is not None:
        cfg["timeout"] = timeout
    return build_reward_functions(cfg)[0][0]


def test_reward_values_that_are_not_finite(user_rewards):
    from align_cli.rewards import RewardFailed

    with pytest.raises(RewardFailed, match=r"reward.function returned nan for all 3 completions of a batch"):
        one("all_nan")(["p"] * 3, ["a", "b", "c"])
    logged = []
    func = one("some_inf")
    assert func(["p"] * 3, ["a", "b", "c"], log_metric=lambda k, v: logged.append((k, v))) == [None, 1.0, 1.0]
    func(["p"] * 3, ["a", "b", "c"], log_metric=lambda k, v: logged.append((k, v)))
    assert logged == [("rewards/function/non_finite", 1.0), ("rewards/function/non_finite", 2.0)]


def test_reward_timeout_is_a_setting_not_a_reward(tmp_path):
    from align_cli.config import normalize_overrides
    from align_cli.rewards import build_reward_functions

    # The method's default reward still applies when only the timeout is set.
    assert normalize_overrides(["method=grpo", "reward.timeout=30"]) == [
        "reward=length",
        "method=grpo",
        "++reward.timeout=30",
    ]
    funcs, _ = build_reward_functions({"length": 10, "timeout": 30})
    assert [f.__name__ for f in funcs] == ["length"] and funcs[0].timeout == 30
    assert build_reward_functions({"length": 10, "timeout": None})[0][0].timeout is None


def test_rules_run_on_the_calling_thread_and_keep_the_time_limit(user_rewards, monkeypatch):
    """The built-in rules skip the watchdog thread (a hand-off per call); reward.timeout still
    holds for them, checked between completions: a user's regex that backtracks for long stops
    the run naming the reward after the completion it was on. User functions keep the thread."""
    import threading

    from align_cli.rewards import RewardFailed, build_reward_functions
    from align_cli.rewards.rules import LengthReward, RegexReward

    threads = []
    score = LengthReward.score
    monkeypatch.setattr(
        LengthReward,
        "score",
        lambda self, text, row: threads.append(threading.current_thread()) or score(self, text, row),
    )
    funcs, _ = build_reward_functions({"length": 10, "timeout": 30})
    assert funcs[0](["p", "q"], ["abc", "abcdefghij"]) == [pytest.approx(0.3), 1.0]
    assert threads == [threading.main_thread()] * 2
    # (x+x+)+y against x...x with no y: exponential backtracking, ~0.1-1 s a text here.
    slow, _ = build_reward_functions({"format": {"type": "regex", "pattern": "(x+x+)+y"}, "timeout": 0.05})
    matched = []
    regex_score = RegexReward.score
    monkeypatch.setattr(
        RegexReward, "score", lambda self, text, row: matched.append(text) or regex_score(self, text, row)
    )
    with pytest.raises(RewardFailed, match=r"reward.format did not return within reward.timeout=0.05 s"):
        slow[0](["p"] * 8, ["x" * 24] * 8)
    assert 1 <= len(matched) < 8  # stopped at the first completion that ended past the limit
    fine, _ = build_reward_functions({"format": {"type": "regex", "pattern": "(x+x+)+y"}, "timeout": None})
    assert fine[0](["p"], ["x" * 12]) == [0.0]  # no limit: it runs to the end
    mixed, _ = build_reward_functions(
        {"length": 10, "function": {"path": "bad_rewards:hangs"}, "timeout": 0.5}
    )
    with pytest.raises(RewardFailed, match=r"reward.function did not return within reward.timeout=0.5 s"):
        mixed[1](["p"], ["a"])  # the user function is still guarded by its thread


def test_a_reward_that_exits_or_hangs_is_named(user_rewards):
    from align_cli.rewards import RewardFailed

    with pytest.raises(RewardFailed, match=r"reward.function called sys.exit\(3\) while scoring"):
        one("exits")(["p"], ["a"])
    started = time.time()
    with pytest.raises(RewardFailed, match=r"reward.function did not return within reward.timeout=0.5 s"):
        one("hangs", timeout=0.5)(["p"], ["a"])
    assert time.time() - started < 5
    assert one("hangs").timeout == 300  # the default


GRPO = [
    "method=grpo",
    "method.args.max_steps=3",
    "method.args.max_completion_length=8",
    "data.eval_ratio=0",
    "plot=false",
    "reward=function",
]


def test_grpo_stops_on_a_reward_with_no_finite_value_after_saving(user_rewards, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AlignError) as info:
        train(compose([*GRPO, "reward.function.path=bad_rewards:all_nan"], run))
    assert "reward.function returned nan for all 8 completions of a batch" in str(info.value)
    assert not (run / "summary.json").exists()


def test_a_stop_request_during_a_reward_call_is_honoured(user_rewards, tmp_path):
    from align_cli.errors import TrainingInterrupted

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train(
            compose([*GRPO, "reward.function.path=bad_rewards:stop_during_call", "+reward.timeout=20"], run)
        )
    assert info.value.exit_code == 128 + signal.SIGTERM and "stopped by SIGTERM at step 2" in str(info.value)
    assert (run / "checkpoint-2" / "trainer_state.json").exists()


# --- interrupts, seeds --------------------------------------------------------------------


def test_ctrl_c_while_preparing_data_is_not_swallowed(tmp_path, monkeypatch):
    """A library's bare `except:` (datasets' fingerprinting has one) cannot eat the interrupt."""
    import align_cli.methods.sft as sft

    build = sft.build

    def swallowing_build(ctx):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except:  # noqa: E722 - what datasets does
            pass
        return build(ctx)

    monkeypatch.setattr(sft, "build", swallowing_build)
    with pytest.raises(KeyboardInterrupt):
        train(compose([*SFT, "method.args.max_steps=1"], tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not list(
        (tmp_path / "run").glob("checkpoint-*")
    )
    assert not (tmp_path / "run" / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_kto_seed_changes_the_run(tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 2)):
        result = train(
            compose(
                ["method=kto", "data.eval_ratio=0", "plot=false", "method.args.max_steps=2", f"seed={seed}"],
                tmp_path / name,
            )
        )
        runs[name] = weights(result.trainer.model)
    assert any(not torch.equal(runs["a"][n], runs["b"][n]) for n in runs["a"])


def test_validate_refuses_a_critic_whose_tokenizer_differs(tmp_path, capsys):
    """PPO's critic from a reward model with another vocabulary: found by validate, no weights loaded."""
    from align_cli import modeling
    from align_cli.cli import main as align
    from align_cli.config import ModelConfig

    tokenizer = modeling.load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    model = modeling.load_model(ModelConfig(), kind="seq_cls", pad_token_id=tokenizer.pad_token_id)
    tokenizer.add_tokens(["<an-extra-token>"])  # another vocabulary than the policy's
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    base = ["data", "validate", "method=ppo", "reward=model", f"reward.model.path={tmp_path / 'rm'}"]
    with pytest.raises(SystemExit):
        align([*base, "method.critic_init=reward"])
    out = capsys.readouterr().out
    assert f"method.critic_init=reward: the reward model '{tmp_path / 'rm'}' uses another tokenizer" in out
    align([*base, "method.critic_init=auto"])  # auto starts the critic from the policy instead
    assert "ready for method=ppo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "how,message",
    [
        ("text", r"reward.model returned nan for all 16 completions of a batch"),
        ("tokens", r"reward.model scored no completion of a batch with a finite value"),
    ],
    ids=["text", "tokens"],
)
def test_ppo_stops_on_a_reward_model_that_scores_nothing_finite(tmp_path, how, message):
    """PPO calls the reward (text), or scores the policy's tokens with the model directly: both guarded."""
    from align_cli import modeling
    from align_cli.config import ModelConfig

    tokenizer = modeling.load_tokenizer(ModelConfig())
    model = modeling.load_model(ModelConfig(), kind="seq_cls", pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))  # a broken head: every score is NaN
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    overrides = [
        "method=ppo",
        "reward=model",
        f"reward.model.path={tmp_path / 'rm'}",
        "method.critic_init=policy",
        f"method.args.reward_model_input={how}",
    ]
    with pytest.raises(AlignError, match=message):
        train(
            compose(
                [*overrides, "method.args.max_steps=2", "data.eval_ratio=0", "plot=false"], tmp_path / "run"
            )
        )
    assert not (tmp_path / "run" / "summary.json").exists()
