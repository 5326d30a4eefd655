"""Model cards (`README.md`) for run folders and exports, written by align itself.

TRL's card for a local base says "fine-tuned version of [None]" and suggests
`pipeline(model="None")`; PPO (our own trainer) writes none. `train()` writes this card after the
model is saved (TRL writes its own at every checkpoint, so ours comes last), for every method:
the base model, the method and its settings, the data with row counts, the final metrics, the
command that reproduces the run, and a loading snippet that works on this machine.
"""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import config as schema

METHOD_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "rm": "reward modelling (RM)",
    "ppo": "PPO with a critic and KL-shaped rewards",
    "dpo": "Direct Preference Optimization (DPO)",
    "kto": "Kahneman-Tversky Optimization (KTO)",
    "grpo": "Group Relative Policy Optimization (GRPO)",
}
# Marks a card as ours, so `align export` knows it can reuse its sections.
MARKER = "<!-- written by align -->"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    return "null" if v is None else str(v)


def _flat(prefix: str, values: dict) -> list[tuple[str, str]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out += _flat(f"{prefix}{key}.", value)
        else:
            out.append((f"{prefix}{key}", _value(value)))
    return out


def reproduce_command(cfg: DictConfig) -> str:
    """`align train` with this run's overrides (Hydra's), or, outside Hydra (tests, notebooks), the
    choices a composed config holds: method, model, data, LoRA, quantization and every method.args key."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [
            o.replace("++method.args.", "method.args.", 1)
            for o in HydraConfig.get().overrides.task
            if not o.lstrip("+~").startswith(("resume=", "output_dir=", "hydra.run.dir="))
        ]
        return " ".join(["align train", *overrides])
    except ValueError:  # not under Hydra
        pass
    parts = [f"method={cfg.method.name}", f"model.name_or_path={cfg.model.name_or_path}"]
    if cfg.data.get("path"):
        parts.append(f"data.path={cfg.data.path}")
    if cfg.peft.get("method") != "none":
        parts += ["peft=lora", f"peft.r={cfg.peft.r}", f"peft.alpha={cfg.peft.alpha}"]
    if cfg.quant.get("bits"):
        parts.append(f"quant={cfg.quant.bits}bit")
    for key, value in (OmegaConf.to_container(cfg.method.get("args") or {}, resolve=True) or {}).items():
        parts.append(f"method.args.{key}={_value(value)}")
    parts.append(f"seed={cfg.seed}")
    return " ".join(["align train", *parts])


def loading_snippet(folder: str, kind: str, chat: bool, adapter: bool) -> str:
    """Python that loads `folder` and uses it once (tests run it as it is)."""
    folder = os.path.abspath(folder)
    if kind == "seq_cls":
        text = (
            'tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}, '
            '{"role": "assistant", "content": "4"}], tokenize=False)'
            if chat
            else '"What is 2 + 2? 4"'
        )
        return (
            "import torch\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'path = "{folder}"\n'
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            "model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)\n"
            f"text = {text}\n"
            "with torch.no_grad():\n"
            '    score = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()\n'
            'print("reward:", score)\n'
        )
    if chat:
        prompt = (
            'messages = [{"role": "user", "content": "What is 2 + 2?"}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
            ")\n"
        )
    else:
        prompt = 'inputs = tokenizer("What is 2 + 2?", return_tensors="pt")\n'
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'path = "{folder}"\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        f"model = AutoModelForCausalLM.from_pretrained(path){'  # an adapter: needs peft installed' if adapter else ''}\n"
        f"{prompt}"
        "output = model.generate(**inputs, max_new_tokens=32)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )


def _front_matter(kind: str, base: str, method: str | None, adapter: bool) -> str:
    from .modeling import looks_local

    lines = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if base and not looks_local(base) and base != "tiny" and not os.path.isdir(base):
        lines.append(f"base_model: {base}")  # the hub reads it; a local path means nothing there
    tags = ["align", *([method] if method else []), *(["lora"] if adapter else [])]
    lines += ["tags:", *[f"- {t}" for t in tags]]
    lines += [f"pipeline_tag: {'text-classification' if kind == 'seq_cls' else 'text-generation'}", "---", ""]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in rows]
    return "\n".join(out)


def run_card(
    output_dir: str,
    cfg: DictConfig,
    metrics: dict[str, float],
    train_rows: int,
    eval_rows: int,
    data_source: str,
) -> str:
    """The card's text for a finished run (see `write_run_card`)."""
    from . import modeling

    method = schema.method_settings(cfg.method)
    name = method["name"]
    base = str(cfg.model.name_or_path)
    adapter = os.path.exists(os.path.join(output_dir, "adapter_config.json"))
    kind = "seq_cls" if name == "rm" else "causal_lm"
    chat = os.path.exists(os.path.join(output_dir, "chat_template.jinja")) or bool(
        cfg.model.get("chat_template")
    )
    resolved = (
        modeling.resolve_model_path(modeling.ModelConfig(name_or_path=base)) if base == "tiny" else base
    )
    lora = ""
    if adapter:
        lora = (
            f"; LoRA r={cfg.peft.r}, alpha={cfg.peft.alpha}, dropout={cfg.peft.dropout}, "
            f"targets {_value(OmegaConf.to_container(cfg.peft, resolve=True).get('target_modules'))}"
        )
        if cfg.quant.get("bits"):
            lora += f" on a {cfg.quant.bits}-bit ({cfg.quant.quant_type}) base (QLoRA)"
    skip = ("name", "args", "sample", "default_reward")
    settings = _flat("", {k: v for k, v in method.items() if k not in skip})
    settings += _flat("args.", method.get("args") or {})
    if cfg.get("reward"):
        settings += _flat("reward.", OmegaConf.to_container(cfg.reward, resolve=True))
    data = cfg.data
    if data.get("eval_path"):
        eval_source = str(data.eval_path)
    elif data.get("eval_split"):
        eval_source = f"split {data.eval_split} of the training data"
    elif eval_rows:
        eval_source = f"held out of the training data by prompt (data.eval_ratio={data.eval_ratio})"
    else:
        eval_source = "none"
    what = "reward model" if kind == "seq_cls" else "language model"
    body = [
        _front_matter(kind, base, name, adapter),
        MARKER,
        f"# {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"A {what} trained from `{base}` with {METHOD_NAMES.get(name, name)}{lora}, "
        "by align (on TRL, transformers and peft)."
        + (
            " This folder holds the LoRA adapter; `align export` merges it into a plain model."
            if adapter
            else ""
        ),
        "",
        "## Base model",
        "",
        f"`{base}`" + (f" (built offline at `{resolved}`)" if resolved != base else ""),
        "",
        "## Method and settings",
        "",
        f"`method={name}`",
        "",
        _table(settings, ("setting", "value")),
        "",
        "## Data",
        "",
        "| split | source | rows |",
        "|---|---|---|",
        f"| train | `{data_source}` | {train_rows} |",
        f"| eval | {eval_source} | {eval_rows} |",
        "",
        "## Final metrics",
        "",
        _table(
            [(k, _value(v)) for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))],
            ("metric", "value"),
        ),
        "",
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(cfg),
        "```",
        "",
        "## Use it",
        "",
        "```python",
        loading_snippet(output_dir, kind, chat, adapter).rstrip(),
        "```",
        "",
        "```bash",
        *(
            [
                f"align chat {os.path.abspath(output_dir)}",
                f"align generate {os.path.abspath(output_dir)} data.path=prompts.jsonl output=out.jsonl",
            ]
            if kind == "causal_lm"
            else []
        ),
        f"align export {os.path.abspath(output_dir)} <out dir>   # a plain model folder"
        + (" (adapter merged)" if adapter else ""),
        "```",
        "",
    ]
    return "\n".join(body)


def write_run_card(
    output_dir: str,
    cfg: DictConfig,
    metrics: dict[str, float],
    train_rows: int,
    eval_rows: int,
    data_source: str,
) -> str:
    """Writes `<output_dir>/README.md` (replacing TRL's card) and returns its path.

    A run composed outside Hydra (tests, notebooks) gets its composed config in `.hydra/config.yaml`
    too, as Hydra's runs have it: `align export` reads the quantization a QLoRA run trained with there.
    """
    config = os.path.join(output_dir, ".hydra", "config.yaml")
    if not os.path.exists(config):
        os.makedirs(os.path.dirname(config), exist_ok=True)
        OmegaConf.save(cfg, config, resolve=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_card(output_dir, cfg, metrics, train_rows, eval_rows, data_source))
    return path


def _sections(card: str, names: tuple[str, ...]) -> str:
    """The `## <name>` sections of a card of ours, in order."""
    out, keep = [], False
    for line in card.splitlines():
        if line.startswith("## "):
            keep = line[3:].strip() in names
        if keep:
            out.append(line)
    return "\n".join(out)


def write_export_card(target: str, final: str, source: str, kind: str, how: str, run: dict) -> str:
    """Writes `<target>/README.md` for an exported model: what was done, how to load it, and the
    run's own card sections (base, method, data, metrics, command) when the run has our card.

    Args:
        target: the folder being written; `final`: where it will be (the snippet loads from there).
    """
    chat = os.path.exists(os.path.join(target, "chat_template.jinja"))
    method = (run.get("method") or {}).get("name")
    base = str((run.get("model") or {}).get("name_or_path", ""))
    parts = [
        _front_matter(kind, base, method, adapter=False),
        MARKER,
        f"# {os.path.basename(os.path.abspath(final))}",
        "",
        f"Exported by `align export` from `{os.path.abspath(source)}`: {how}. It loads with plain "
        "`from_pretrained` (no peft needed).",
        "",
        "## Use it",
        "",
        "```python",
        loading_snippet(final, kind, chat, adapter=False).rstrip(),
        "```",
        "",
    ]
    readme = os.path.join(source, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        if MARKER in text:
            wanted = ("Base model", "Method and settings", "Data", "Final metrics", "Reproduce")
            sections = _sections(text, wanted).replace("\n## ", "\n### ").replace("## ", "### ", 1)
            parts += ["## The run it comes from", "", sections, ""]
    path = os.path.join(target, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
