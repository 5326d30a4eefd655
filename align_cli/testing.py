"""Helpers for tests (and notebooks): compose a config the way `align train` would.

cfg = compose(["method=dpo", "peft=lora", "method.args.max_steps=3"], output_dir=tmp_path)
result = train(cfg)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from . import config as schema


def compose(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """Composes conf/config.yaml with Hydra's compose API and sets the run folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(schema.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=schema.normalize_overrides(list(overrides)))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def share_site_packages(venv: str | Path) -> Path:
    """Lets a new virtual environment see this interpreter's packages, after its own.

    `python -m venv --system-site-packages` run from inside a venv links the *base*
    interpreter's packages, not the active venv's (where torch is), so tests and benchmarks
    that build a second environment point it at this one with a `.pth` file instead. Packages
    installed into the new environment still win: its own site-packages comes first.

    Returns:
        The `.pth` file written.
    """
    import subprocess
    import sysconfig

    venv = Path(venv)
    python = venv / ("Scripts" if (venv / "Scripts").is_dir() else "bin") / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    pth = Path(own) / "_align_shared_site.pth"
    pth.write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    return pth
