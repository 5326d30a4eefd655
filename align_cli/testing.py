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


def load_script(name: str):
    """A script of the checkout's scripts/ folder (`name` without .py), imported as a module.

    The scripts are no package (they run as `python scripts/<name>.py`); tests and other
    scripts use this to reach their functions.
    """
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def greedy_behaviour(
    model_dir: str | Path,
    prompts_path: str | Path,
    phrases: dict[str, list[str]],
    column: str = "expected",
    reward_model: str | Path | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> dict:
    """How a policy behaves on a prompt file: greedy completions, classified by how they open.

    Each prompt row (`instruction`, optional `input`, and `column`: the expected label, e.g.
    the harmlessness task's `refuse` / `help`) is laid out with the policy's chat template and
    completed greedily; `align_cli.rewards.rules.behaviour_of` reads the behaviour.

    Args:
        model_dir: a policy run folder (or any saved causal LM with its tokenizer).
        prompts_path: a JSON-lines prompt file.
        phrases: label -> opening phrases (see `behaviour_of`).
        column: the column holding each row's expected label.
        reward_model: an `rm` run folder: also report the mean reward-model score.
        max_new_tokens: the most tokens generated per prompt.
        batch_size: prompts per generate call.

    Returns:
        `{"right": {label: share right among rows expecting it}, "right_all", "other"` (share
        opening with no phrase), `"distinct"` (distinct completions / rows), `"score"` (mean
        reward-model score, with `reward_model`), `"samples"`: [(prompt, completion, label)]}.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rewards.rules import behaviour_of

    rows = [json.loads(line) for line in Path(prompts_path).read_text(encoding="utf-8").splitlines() if line]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompts = [f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"] for r in rows]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    completions: list[str] = []
    for s in range(0, len(rows), batch_size):
        texts = [
            tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in messages[s : s + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
            )
        completions += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    labels = [behaviour_of(c, phrases) for c in completions]
    right: dict[str, float] = {}
    for label in phrases:
        mine = [got == label for got, r in zip(labels, rows, strict=True) if r[column] == label]
        if mine:
            right[label] = sum(mine) / len(mine)
    result = {
        "right": right,
        "right_all": sum(got == r[column] for got, r in zip(labels, rows, strict=True)) / len(rows),
        "other": sum(got is None for got in labels) / len(rows),
        "distinct": len(set(completions)) / len(rows),
        "samples": list(zip(prompts, completions, labels, strict=True)),
    }
    if reward_model is not None:
        from .rewards.model import ModelReward

        scorer = ModelReward("rm", path=str(reward_model))
        assistant = [[{"role": "assistant", "content": c}] for c in completions]
        result["score"] = sum(scorer(messages, assistant)) / len(rows)
    return result
