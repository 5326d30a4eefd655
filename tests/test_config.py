"""The config tree: every YAML composes, schemas catch typos, the registry matches conf/method/."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from align_cli.config import CONF_DIR, normalize_overrides
from align_cli.errors import AlignError
from align_cli.methods import REGISTRY
from align_cli.testing import compose, share_site_packages

GROUPS = ["method", "model", "data", "peft", "quant", "reward", "dist"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_registry_matches_method_yamls():
    """Each method yaml extends its settings class (Hydra's method/schema/<name>)."""
    assert set(REGISTRY) == set(options("method"))
    for name in REGISTRY:
        yaml = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
        assert list(yaml.defaults) == [f"schema/{name}@_here_", "_self_"]
        assert compose([f"method={name}"]).method.name == name


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_composes_and_starts_with_its_command(group):
    for option in options(group):
        text = (CONF_DIR / group / f"{option}.yaml").read_text(encoding="utf-8")
        assert text.startswith("# align "), f"{group}/{option}.yaml must open with the command that uses it"
        overrides = [f"{group}={option}"] if group == "method" else ["method=dpo", f"{group}={option}"]
        cfg = compose(overrides)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if group == "method":
            assert cfg.method.name == option


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_args_builds_its_trl_config(name, tmp_path):
    """Each method's YAML passes the checks `align train` runs before loading weights, and every
    `method.args` key of it lands in the TRL config the trainer gets."""
    from align_cli.run_checks import checked_config

    cfg = compose([f"method={name}"])
    module, ctx, _ = checked_config(cfg)
    ctx.output_dir = str(tmp_path)
    args = ctx.trl_config(module.config_class())
    for key, value in (OmegaConf.to_container(cfg.method, resolve=True).get("args") or {}).items():
        assert getattr(args, key) == value
    assert args.output_dir == str(tmp_path)


def test_typo_in_typed_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="nme_or_path"):
        compose(["method=dpo", "model.nme_or_path=x"])
    with pytest.raises(ConfigCompositionException):
        compose(["method=dpo", "seed=abc"])


def test_unknown_method_arg_names_the_key_and_nearest(tmp_path):
    from align_cli.testing import compose as c
    from align_cli.train import train

    with pytest.raises(AlignError, match=r"method\.args\.betta .*did you mean: beta"):
        train(c(["method=dpo", "method.args.betta=0.2"], tmp_path))


def test_method_args_override_without_plus():
    assert normalize_overrides(["method.args.max_steps=3", "seed=1", "+x=1"]) == [
        "++method.args.max_steps=3",
        "seed=1",
        "+x=1",
    ]
    assert normalize_overrides(["method=grpo"]) == ["reward=length", "method=grpo"]
    assert normalize_overrides(["method=grpo", "reward=keyword"]) == ["method=grpo", "reward=keyword"]
    cfg = compose(
        ["method=dpo", "method.args.max_steps=3", "method.args.beta=0.5", "data.columns.prompt=question"]
    )
    assert cfg.method.args.max_steps == 3 and cfg.method.args.beta == 0.5
    assert cfg.data.columns.prompt == "question"


def test_hydra_override_grammar():
    cfg = compose(["method=dpo", "+method.args.note=hi", "~method.args.beta", "peft=lora", "peft.r=4"])
    assert cfg.method.args.note == "hi" and "beta" not in cfg.method.args
    assert cfg.peft.method == "lora" and cfg.peft.r == 4


# --- method settings: typed per method (methods/<name>.py `Settings`) ----------------------------

# (overrides, what the one-line error says): each fails when composing, before anything loads.
METHOD_KEY_ERRORS = [
    (
        ["method=rm", "method.mdoe=listwise"],
        "method.mdoe: 'mdoe' is not a key of method=rm (trainer settings go under method.args.<key>) "
        "(did you mean: mode, name?); valid keys: name, dataset_type, sample, args, mode, normalize",
    ),
    # With `+` Hydra would add the key silently: the settings class refuses it, with the same line.
    (
        ["method=rm", "+method.mdoe=listwise"],
        "method.mdoe: 'mdoe' is not a key of method=rm (trainer settings go under method.args.<key>) "
        "(did you mean: mode, name?); valid keys: name, dataset_type, sample, args, mode, normalize",
    ),
    (
        ["method=ppo", "method.stop_on_collapse=maybe"],
        "method.stop_on_collapse=maybe: Value 'maybe' is not a valid bool (type str); use true or false",
    ),
    (
        ["method=rm", "method.mode=foo"],
        "method.mode='foo' is not valid: use one of pairwise, pointwise, listwise",
    ),
    (
        ["method=rm", "method.mode=listwise", "method.dataset_type=preference"],
        "method.mode=listwise reads listwise data, but method.dataset_type='preference'",
    ),
    (
        ["method=grpo", "method.advantage=ranks"],
        "method.advantage='ranks' is not valid: use zscore (TRL's) or rank (the seed's) (did you mean: rank?)",
    ),
    (
        ["method=grpo", "+method.collapse.patiance=3"],
        "method.collapse.patiance: 'patiance' is not a method.collapse",
    ),
    (
        ["method=ppo", "method.collapse.patience=0"],
        "method.collapse.patience=0 must be a whole number, at least 1",
    ),
    (
        ["method=dpo", "method.dataset_type=text"],
        "method.dataset_type=text is not valid for method=dpo: use one of",
    ),
    # The old name of dataset_type: named, with the new one.
    (["method=dpo", "method.format=sft"], "method.format: 'format' is not a key of method=dpo"),
    (["method=kto", "+method.format=sft"], "method.format: 'format' is not a key of method=kto"),
]


@pytest.mark.parametrize(("overrides", "message"), METHOD_KEY_ERRORS)
def test_a_wrong_method_setting_fails_when_composing(overrides, message):
    from align_cli.compose import compose_checked

    with pytest.raises(AlignError) as err:
        compose_checked(normalize_overrides(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
    if "format" in overrides[-1]:
        assert "(did you mean: dataset_type? method.format is now method.dataset_type" in str(err.value)


def test_train_and_validate_refuse_a_method_key_typo_alike(tmp_path):
    """`align train` and `align data validate` compose through the same path: the same one line, exit 1."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    lines = []
    for command in (["train"], ["data", "validate"]):
        for typo in ("method.mdoe=listwise", "+method.mdoe=listwise"):
            run = subprocess.run(
                [sys.executable, "-m", "align_cli", *command, "method=rm", typo],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            )
            assert run.returncode == 1, run.stderr
            assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
            lines.append(run.stderr)
    assert len(set(lines)) == 1 and lines[0].startswith(
        "align: error: method.mdoe: 'mdoe' is not a key of method=rm"
    )
    assert not (tmp_path / "outputs").exists()  # refused before a run folder was made


def test_method_defaults_live_in_the_settings_class(monkeypatch):
    """The yaml holds only `args` sizes; the method's own defaults come from its dataclass."""
    from align_cli.config import method_settings
    from align_cli.methods import grpo, ppo

    cfg = compose(["method=ppo"])
    assert cfg.method.critic_head == "zero" and cfg.method.critic_init == "auto"
    assert cfg.method.collapse.patience == 2 and cfg.method.stop_on_collapse is False
    assert set(OmegaConf.load(CONF_DIR / "method" / "ppo.yaml")) == {"defaults", "args"}
    # rm's dataset type and sample follow its mode (no interpolation in the yaml).
    assert "oc.select" not in (CONF_DIR / "method" / "rm.yaml").read_text(encoding="utf-8")
    listwise = method_settings(compose(["method=rm", "method.mode=listwise"]).method)
    assert (listwise["dataset_type"], listwise["sample"]) == ("listwise", "rm_listwise.jsonl")
    pairwise = method_settings(compose(["method=rm"]).method)
    assert (pairwise["dataset_type"], pairwise["sample"]) == ("preference", "dpo.jsonl")
    # The reward a method picks when none is named is its class's `default_reward`.
    monkeypatch.setattr(grpo.Settings, "default_reward", "keyword")
    assert normalize_overrides(["method=grpo"]) == ["reward=keyword", "method=grpo"]
    assert normalize_overrides(["method=dpo"]) == ["method=dpo"]  # takes no reward
    assert ppo.Settings().default_reward == "length"


def test_a_method_sweep_composes_each_method():
    from align_cli.compose import compose_checked, probe_sets

    probes = probe_sets(normalize_overrides(["method=dpo,kto", "method.args.max_steps=1"]), multirun=True)
    assert [compose_checked(p).method.dataset_type for p in probes] == ["preference", "kto"]


def test_non_editable_install_finds_conf_and_samples(tmp_path):
    """`pip install .` (not -e) gives an `align` that composes configs and finds the samples."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    venv = tmp_path / "venv"
    # Not --system-site-packages: from inside a venv that sees the *base* interpreter's packages
    # (no torch there). The new venv sees this one's packages through a .pth file instead.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    share_site_packages(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, str(root)], check=True, capture_output=True)
    out = subprocess.run(
        [str(venv / "bin" / "align"), "train", "method=dpo", "--cfg", "job", "--resolve"],
        cwd=tmp_path,  # far from the checkout: nothing may be found relative to the cwd
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "name: dpo" in out
    code = (
        "import align_cli.config as c; print(c.CONF_DIR); print(c.SAMPLES_DIR); "
        "print(sorted(p.name for p in c.SAMPLES_DIR.iterdir())); "
        "print(sorted(p.name for p in (c.CONF_DIR / 'dist').iterdir()) + sorted(p.name for p in (c.CONF_DIR / 'deepspeed').iterdir()))"
    )
    conf_dir, samples_dir, files, dist_files = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "site-packages" in conf_dir and "site-packages" in samples_dir
    assert "dpo.jsonl" in files
    assert "fsdp.yaml" in dist_files and "zero3.json" in dist_files  # dist= and its DeepSpeed configs ship
