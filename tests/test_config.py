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
    assert set(REGISTRY) == set(options("method"))
    for name in REGISTRY:
        assert OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml").name == name


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
    from align_cli.train import checked_config

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
    cfg = compose(["method=dpo", "+method.note=hi", "~method.args.beta", "peft=lora", "peft.r=4"])
    assert cfg.method.note == "hi" and "beta" not in cfg.method.args
    assert cfg.peft.method == "lora" and cfg.peft.r == 4


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
