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
