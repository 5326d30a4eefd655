"""`align eval`: how aligned are these models? Policies on prompts, reward models on labelled data.

    align eval model.name_or_path=outputs/ppo/<run> reward=model reward.model.path=outputs/rm/<run> \\
        data.path=heldout_prompts.jsonl eval.reference=outputs/sft/<run>
    align eval model.name_or_path=<start>,<sft run>,<ppo run> ...       # several models, one table
    align eval method=rm model.name_or_path=outputs/rm/<run> data.path=heldout_pairs.jsonl
    align eval method=rm method.mode=listwise model.name_or_path=<rm run> data.path=rankings.jsonl

Policies (no `method`, or method=ppo|grpo for their sample prompts): each model answers every
prompt of `data.path` (any prompt layout `align train method=ppo` reads), greedily and by
sampling (`eval.*`). For each kind of completion the table has the mean reward under the
`reward` option (a reward model, rules, your functions or a `mix`, exactly as PPO/GRPO score),
the win rate against `eval.reference` (the same reward as judge: 1 a win, 0.5 a tie, per
prompt), the mean length in tokens, distinct-1/2 and the share of completions identical across
different prompts (align_cli/diagnostics.py); on the sampled ones also the KL to the reference,
mean over tokens of log pi - log pi_ref on the policy's own samples (at the sampling
temperature; 0 for a model against itself).

Reward models (`method=rm`, `method.mode` picks the data): pairwise accuracy and margin,
listwise Kendall tau and top-1 accuracy, pointwise MSE (on the scale the model was trained on),
Pearson and Spearman, computed by the functions training's evaluation uses (rm_metrics.py).

The eval folder (`outputs/eval/<time>/`, or `hydra.run.dir=` / `output_dir=`) gets eval.json
(every figure), eval.md (the table, also printed) and samples.jsonl (every completion and its
reward), beside `.hydra/` with the composed config. `evaluate_policies` and
`evaluate_reward_models` are what `align pipeline` calls.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import config as schema
from .config import DataConfig, ModelConfig
from .errors import AlignError

POLICY_SAMPLE = "prompts.jsonl"  # data_samples/ prompts when data.path is null and no method names one


@dataclass
class EvalSettings:
    """How policies are evaluated (`eval.*`)."""

    reference: str | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int = 16
    greedy: bool = True
    sampled: bool = True

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"eval.max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            problems.append(f"eval.temperature={self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            problems.append(f"eval.top_p={self.top_p} must be in (0, 1]")
        if self.num_samples < 1 or self.batch_size < 1:
            problems.append("eval.num_samples and eval.batch_size must be at least 1")
        if not (self.greedy or self.sampled):
            problems.append("eval.greedy and eval.sampled are both false: nothing to evaluate")
        if problems:
            raise AlignError("; ".join(problems))


@dataclass
class EvalRoot:
    """The root of `align eval`'s composed config (conf/eval.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = None
    reward: Any = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 42
    output_dir: str | None = None  # null: hydra.run.dir
    debug: bool = False


def register() -> None:
    """Registers the eval schema beside the training one; safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    schema.register()
    ConfigStore.instance().store(name="align_eval_schema", node=EvalRoot)


# --- generation and scoring ----------------------------------------------------------------


@dataclass
class Completions:
    """One model's completions to the prompts: texts, token ids, and the prompts' token ids."""

    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # without padding; the stop token kept when one ended it
    ended: list[bool]  # whether a stop token ended the response
    rows: list[int]  # which prompt row each completion answers


def _prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt as PPO tokenizes them (chat template + generation prompt for messages)."""
    if prompts and isinstance(prompts[0], list):
        texts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts))["input_ids"]


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def generate(model, tokenizer, prompts: list, settings: EvalSettings, greedy: bool, seed: int) -> Completions:
    """Greedy (one per prompt) or sampled (`num_samples` per prompt) completions, in batches.

    Only the settings given here shape the distribution (a checkpoint's generation_config
    with e.g. a repetition penalty would otherwise apply too).
    """
    import torch
    from transformers import GenerationConfig

    from .ppo.models import sampling_only

    stop = _stop_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=not greedy,
        max_new_tokens=settings.max_new_tokens,
        temperature=None if greedy else settings.temperature,
        top_p=None if greedy else settings.top_p,
        top_k=None,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = _prompt_ids(tokenizer, prompts)
    repeats = 1 if greedy else settings.num_samples
    rows = [r for r in range(len(ids)) for _ in range(repeats)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts, responses, ended = [], [], []
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad(), sampling_only(model, config):
        for start in range(0, len(rows), settings.batch_size):
            chunk = [ids[r] for r in rows[start : start + settings.batch_size]]
            width = max(len(c) for c in chunk)
            input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), None)
                kept = row if cut is None else row[: cut + 1]
                responses.append(kept)
                ended.append(cut is not None)
                texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return Completions(texts, [ids[r] for r in rows], responses, ended, rows)


def score(
    funcs: list, weights: list[float], rows: list[dict], completions: Completions
) -> dict[str, list[float]]:
    """Each completion's weighted reward (`total`) and each function's own, NaN where none applies.

    Rewards are called with TRL's signature, as PPO and GRPO call them: the prompts, the
    completions (assistant messages for conversational prompts), the completion ids and every
    other column of the prompt file.
    """
    picked = [rows[r] for r in completions.rows]
    prompts = [r["prompt"] for r in picked]
    conversational = bool(prompts) and isinstance(prompts[0], list)
    texts = completions.texts
    items = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    columns = sorted({k for r in picked for k in r if k != "prompt"})
    kwargs = {c: [r.get(c) for r in picked] for c in columns}
    out: dict[str, list[float]] = {}
    for func in funcs:
        values = func(prompts=prompts, completions=items, completion_ids=completions.response_ids, **kwargs)
        out[getattr(func, "__name__", "reward")] = [math.nan if v is None else float(v) for v in values]
    total = []
    for i in range(len(texts)):
        parts = [(w, out[getattr(f, "__name__", "reward")][i]) for f, w in zip(funcs, weights, strict=True)]
        applied = [w * v for w, v in parts if not math.isnan(v)]
        total.append(sum(applied) if applied else math.nan)  # an abstaining function adds 0, as in PPO
    return {"total": total, **out}


def kl_to_reference(policy, reference, completions: Completions, temperature: float, pad_id: int) -> float:
    """Mean over response tokens of log pi(y_t) - log pi_ref(y_t) on the policy's own samples.

    Both log-probs are at the sampling temperature, so this estimates KL(pi_T || pi_ref,T) of the
    distribution the samples came from. The reference must read the policy's tokens.
    """
    import torch

    from .ppo.core import token_logprobs
    from .ppo.models import forward_inputs

    device = next(policy.parameters()).device
    total, tokens = 0.0, 0
    pairs = list(zip(completions.prompt_ids, completions.response_ids, strict=True))
    with torch.no_grad():
        for start in range(0, len(pairs), 16):
            chunk = [(p, r) for p, r in pairs[start : start + 16] if r]
            if not chunk:
                continue
            p_width, r_width = max(len(p) for p, _ in chunk), max(len(r) for _, r in chunk)
            seqs, masks, rmask = [], [], []
            for p, r in chunk:  # prompts left-padded, responses right-padded, as sampled
                seqs.append([pad_id] * (p_width - len(p)) + p + r + [pad_id] * (r_width - len(r)))
                masks.append([0] * (p_width - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_width - len(r)))
                rmask.append([1.0] * len(r) + [0.0] * (r_width - len(r)))
            seqs_t = torch.tensor(seqs, device=device)
            inputs = forward_inputs(seqs_t, torch.tensor(masks, device=device))
            targets = seqs_t[:, -r_width:]
            mask = torch.tensor(rmask, device=device)
            logps = []
            for model in (policy, reference):
                logits = model(**inputs, logits_to_keep=r_width, use_cache=False).logits.float() / temperature
                logps.append(token_logprobs(logits, targets))
            total += float(((logps[0] - logps[1]) * mask).sum())
            tokens += int(mask.sum())
    return total / tokens if tokens else math.nan


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Share of comparisons the policy wins (ties count half); pairs with a NaN are left out."""
    results = [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy, reference, strict=True)
        if not (math.isnan(p) or math.isnan(r))
    ]
    return sum(results) / len(results) if results else math.nan


# --- policies ------------------------------------------------------------------------------


def _load_policy(model_cfg: ModelConfig, path: str):
    """Tokenizer and causal LM of a model path (a run folder, full or LoRA, a hub id, `tiny`)."""
    import torch

    from . import modeling

    tokenizer = modeling.load_tokenizer(model_cfg, path)
    model = modeling.load_model(model_cfg, kind="causal_lm", path=path, pad_token_id=tokenizer.pad_token_id)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return tokenizer, model


def _check_room(loaded, tokenizer, model_cfg: ModelConfig, settings: EvalSettings, path: str) -> None:
    """Refuses prompts with no room for `eval.max_new_tokens` within model.max_length (as PPO does)."""
    lengths = [len(ids) for ids in _prompt_ids(tokenizer, [r["prompt"] for r in loaded.rows])]
    limit = model_cfg.max_length - settings.max_new_tokens
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        raise AlignError(
            f"{len(long)} of {len(lengths)} prompts are longer than model.max_length - eval.max_new_tokens = "
            f"{model_cfg.max_length} - {settings.max_new_tokens} = {limit} tokens for {path} (first: "
            f"{loaded.origins[long[0]]}, {lengths[long[0]]} tokens): raise model.max_length or shorten them"
        )


def _read_prompts(data_cfg: DataConfig, conversational: bool, sample: str | None, check):
    from .data.convert import read_and_convert

    loaded = read_and_convert(data_cfg, "prompt", conversational, sample or POLICY_SAMPLE, row_check=check)
    if not loaded.rows:
        raise AlignError(f"{loaded.source}: no prompts to evaluate on")
    return loaded


def evaluate_policies(
    models: list[str],
    prompts_cfg: DataConfig,
    reward_cfg: dict | None,
    reference: str | None = None,
    settings: EvalSettings | None = None,
    model_cfg: ModelConfig | None = None,
    output_dir: str | None = None,
    seed: int = 42,
    sample: str | None = None,
) -> dict:
    """Evaluates policies side by side on one prompt file.

    Args:
        models: model paths (run folders, full or LoRA; saved models; hub ids; `tiny`).
        prompts_cfg: where the prompts are (`data.path`, any layout method=ppo reads).
        reward_cfg: the `reward` config (as for PPO/GRPO); None or {}: no reward, no win rate.
        reference: the model for win rate and KL (e.g. the SFT policy); None: neither.
        settings: generation settings (defaults: `EvalSettings()`).
        model_cfg: the other model settings (dtype, max_length, chat_template...); its
            `name_or_path` is ignored.
        output_dir: where samples.jsonl goes (None: not written).
        seed: the seed of every model's sampling.
        sample: the data_samples/ file used when `prompts_cfg.path` is null.

    Returns:
        `{"kind": "policy", "data", "reference", "settings", "models": [{"model", "metrics"}]}`;
        metrics per kind of completion (`_greedy`, `_sampled`): `reward`, `rewards/<name>`
        (several rewards), `win_rate`, `length`, `eos_rate`, `distinct_1`, `distinct_2`,
        `identical_share`; and `kl_to_reference` (sampled).

    Raises:
        AlignError: no model, a model path that does not exist, prompts that cannot be read, a
            reward that cannot be built or reads a missing column, a reference with another
            tokenizer (no KL can be taken).
    """
    from . import modeling
    from .diagnostics import batch_metrics
    from .rewards import build_reward_functions, check_columns, message_text, row_check

    settings = settings or EvalSettings()
    model_cfg = model_cfg or ModelConfig()
    if not models:
        raise AlignError("model.name_or_path names no model to evaluate")
    for path in [*models, *([reference] if reference else [])]:  # before anything loads
        modeling.resolve_model_path(model_cfg, path)
    check = row_check(reward_cfg) if reward_cfg else None
    funcs, weights = build_reward_functions(reward_cfg) if reward_cfg else ([], [])
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for func in funcs:
        if hasattr(func, "to"):  # reward models beside the policies
            func.to(device)
    modes = [m for m, on in (("greedy", settings.greedy), ("sampled", settings.sampled)) if on]
    samples_path = os.path.join(output_dir, "samples.jsonl") if output_dir else None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    if samples_path and os.path.exists(samples_path):
        os.remove(samples_path)

    ref = None  # (tokenizer, model, {conversational: {mode: (completions, rewards)}})
    if reference:
        ref_tok, ref_model = _load_policy(model_cfg, reference)
        ref = (ref_tok, ref_model, {})
    results, source = [], None
    for path in models:
        tokenizer, model = _load_policy(model_cfg, path)
        conversational = tokenizer.chat_template is not None
        loaded = _read_prompts(prompts_cfg, conversational, sample, check)
        _check_room(loaded, tokenizer, model_cfg, settings, path)
        source = loaded.source
        check_columns(funcs, sorted({k for r in loaded.rows for k in r}), loaded.source)
        rows = loaded.rows
        metrics: dict[str, float] = {}
        table: dict[str, tuple[Completions, dict[str, list[float]]]] = {}
        for mode in modes:
            done = generate(model, tokenizer, [r["prompt"] for r in rows], settings, mode == "greedy", seed)
            rewards = score(funcs, weights, rows, done) if funcs else {}
            table[mode] = (done, rewards)
            prompts = [rows[r]["prompt"] for r in done.rows]
            if funcs:
                metrics[f"reward_{mode}"] = _mean(rewards["total"])
                if len(funcs) > 1:
                    for name, values in rewards.items():
                        if name != "total":
                            metrics[f"rewards/{name}_{mode}"] = _mean(values)
            metrics[f"length_{mode}"] = sum(len(r) for r in done.response_ids) / len(done.response_ids)
            metrics[f"eos_rate_{mode}"] = sum(done.ended) / len(done.ended)
            for key, value in batch_metrics(prompts, done.texts).items():
                if key != "top_completion_share":
                    metrics[f"{key}_{mode}"] = value
        ref_table: dict[str, tuple[Completions, dict[str, list[float]]]] = {}
        if ref is not None:
            ref_tok, ref_model, cache = ref
            if ref_tok.get_vocab() != tokenizer.get_vocab():
                raise AlignError(
                    f"eval.reference={reference} has another tokenizer than {path}: the KL between them cannot "
                    "be measured on the policy's tokens; compare models that share a tokenizer"
                )
            key = json.dumps([r["prompt"] for r in rows], ensure_ascii=False, sort_keys=True)
            if key not in cache:  # the reference answers each prompt layout once
                cache[key] = {}
                for mode in modes:
                    done = generate(
                        ref_model, ref_tok, [r["prompt"] for r in rows], settings, mode == "greedy", seed
                    )
                    cache[key][mode] = (done, score(funcs, weights, rows, done) if funcs else {})
            ref_table = cache[key]
            for mode in modes:
                if funcs:
                    metrics[f"win_rate_{mode}"] = win_rate(
                        table[mode][1]["total"], ref_table[mode][1]["total"]
                    )
            if settings.sampled:
                metrics["kl_to_reference"] = kl_to_reference(
                    model, ref_model, table["sampled"][0], settings.temperature, tokenizer.pad_token_id
                )
        if samples_path:
            with open(samples_path, "a", encoding="utf-8") as f:
                for mode in modes:
                    done, rewards = table[mode]
                    other = ref_table.get(mode)
                    for i, text in enumerate(done.texts):
                        row = {
                            "model": path,
                            "mode": mode,
                            "prompt": message_text(rows[done.rows[i]]["prompt"]),
                            "completion": text,
                        }
                        if funcs:
                            row["reward"] = _json_number(rewards["total"][i])
                        if other is not None:
                            row["reference_completion"] = other[0].texts[i]
                            if funcs:
                                row["reference_reward"] = _json_number(other[1]["total"][i])
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        results.append({"model": path, "metrics": metrics})
        del model
    return {
        "kind": "policy",
        "data": source,
        "rows": len(rows),
        "reference": reference,
        "reward": reward_cfg or None,
        "settings": asdict(settings),
        "models": results,
    }


# --- reward models -------------------------------------------------------------------------


def _normalizer(path: str):
    """The score normalisation a pointwise reward model was trained with (none if it says nothing)."""
    from .methods.rm_losses import ScoreNormalizer

    for name in ("score_normalization.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            data = data.get("score_normalization", data) if name == "config.json" else data
            if isinstance(data, dict) and "method" in data:
                return ScoreNormalizer(str(data["method"]), float(data["shift"]), float(data["scale"]))
    return ScoreNormalizer()


def evaluate_reward_models(
    models: list[str],
    data_cfg: DataConfig,
    mode: str = "pairwise",
    sample: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Scores labelled data with reward models and computes training's evaluation metrics.

    Args:
        models: reward-model paths (`rm` run folders, full or LoRA, saved classifiers, hub ids).
        data_cfg: the data (`data.path`): pairs, scored rows or rankings, as method=rm reads them.
        mode: pairwise | pointwise | listwise (`method.mode`).
        sample: the data_samples/ file used when `data_cfg.path` is null.
        batch_size: rows per reward-model call.

    Returns:
        `{"kind": "rm", "mode", "data", "rows", "models": [{"model", "metrics"}]}` with the
        metrics of align_cli/methods/rm_metrics.py for the mode (the names training logs with
        an `eval_` prefix).

    Raises:
        AlignError: an unknown mode, a path that is no reward model, data that cannot be read.
    """
    import numpy as np
    import torch

    from .data.convert import read_and_convert
    from .data.holdout import prompt_key
    from .methods.rm import MODES
    from .methods.rm_metrics import PAD_RANK, listwise_metrics, pairwise_metrics, pointwise_metrics
    from .rewards.model import ModelReward

    if mode not in MODES:
        raise AlignError(f"method.mode={mode!r} is not valid: use one of {', '.join(MODES)}")
    if not models:
        raise AlignError("model.name_or_path names no reward model to evaluate")
    results, source, n_rows = [], None, 0
    for path in models:
        try:
            rm = ModelReward("model", path=path, batch_size=batch_size)
        except AlignError as err:  # it names the reward key; here the model is model.name_or_path
            raise AlignError(str(err).replace("reward.model.path", "model.name_or_path", 1)) from None
        rm.to("cuda" if torch.cuda.is_available() else "cpu")
        loaded = read_and_convert(data_cfg, MODES[mode], rm.tokenizer.chat_template is not None, sample)
        rows, source, n_rows = loaded.rows, loaded.source, len(loaded.rows)
        if not rows:
            raise AlignError(f"{loaded.source}: no rows to evaluate on")
        if mode == "pairwise":
            prompts = [r["prompt"] for r in rows]
            chosen = rm(prompts=prompts, completions=[r["chosen"] for r in rows])
            rejected = rm(prompts=prompts, completions=[r["rejected"] for r in rows])
            metrics = pairwise_metrics(np.stack([chosen, rejected], axis=1))
        elif mode == "pointwise":
            normalizer = _normalizer(rm.path if os.path.isdir(str(rm.path)) else "")
            rewards = rm(prompts=[r["prompt"] for r in rows], completions=[r["completion"] for r in rows])
            ids: dict[str, int] = {}
            groups = [ids.setdefault(prompt_key({"prompt": r["prompt"]}), len(ids)) for r in rows]
            targets = [normalizer(r["score"]) for r in rows]
            metrics = pointwise_metrics(rewards, targets, groups)
        else:
            sizes = [len(r["completions"]) for r in rows]
            flat_prompts = [r["prompt"] for r in rows for _ in r["completions"]]
            flat = rm(prompts=flat_prompts, completions=[c for r in rows for c in r["completions"]])
            k_max = max(sizes)
            rewards = np.zeros((len(rows), k_max))
            ranks = np.full((len(rows), k_max), PAD_RANK)
            start = 0
            for g, k in enumerate(sizes):  # completions are best first: rank = position
                rewards[g, :k] = flat[start : start + k]
                ranks[g, :k] = np.arange(k)
                start += k
            metrics = listwise_metrics(rewards, ranks)
        results.append({"model": path, "metrics": {k: float(v) for k, v in metrics.items()}})
    return {"kind": "rm", "mode": mode, "data": source, "rows": n_rows, "models": results}


# --- output --------------------------------------------------------------------------------


def _json_number(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def strict_json(obj: Any) -> Any:
    """The result as strict JSON has it: NaN (an undefined metric) becomes null."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float):
        return _json_number(obj)
    return obj


POLICY_COLUMNS = [
    ("reward_greedy", "reward (greedy)"),
    ("reward_sampled", "reward (sampled)"),
    ("win_rate_greedy", "win rate (greedy)"),
    ("win_rate_sampled", "win rate (sampled)"),
    ("kl_to_reference", "KL to ref"),
    ("length_greedy", "length (greedy)"),
    ("length_sampled", "length (sampled)"),
    ("distinct_1_greedy", "distinct-1 (greedy)"),
    ("distinct_2_greedy", "distinct-2 (greedy)"),
    ("distinct_1_sampled", "distinct-1 (sampled)"),
    ("distinct_2_sampled", "distinct-2 (sampled)"),
    ("identical_share_greedy", "identical (greedy)"),
    ("identical_share_sampled", "identical (sampled)"),
]
RM_COLUMNS = [
    ("accuracy", "accuracy"),
    ("margin", "margin"),
    ("kendall_tau", "Kendall tau"),
    ("top1_accuracy", "top-1"),
    ("mse", "MSE"),
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
]


def markdown_table(result: dict) -> str:
    """The result as a markdown table, one row per model (metrics that none has are left out)."""
    columns = POLICY_COLUMNS if result["kind"] == "policy" else RM_COLUMNS
    every = [m["metrics"] for m in result["models"]]
    shown = [(k, title) for k, title in columns if any(k in m for m in every)]
    # Each reward of a mix too; the rest (e.g. eos_rate) is in eval.json.
    extra = sorted({k for m in every for k in m if k.startswith("rewards/")})
    shown += [(k, k) for k in extra]
    lines = [
        "| model | " + " | ".join(title for _, title in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for entry in result["models"]:
        cells = []
        for key, _ in shown:
            value = entry["metrics"].get(key)
            cells.append(
                f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
            )
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str) -> str:
    """Writes eval.json and eval.md into `output_dir`; returns the table."""
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(result)
    with open(os.path.join(output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(strict_json(result), f, indent=2, ensure_ascii=False, allow_nan=False)
    header = f"# align eval: {result['kind']} on {result['data']} ({result['rows']} rows)\n\n"
    if result.get("reference"):
        header += f"Reference (win rate, KL): {result['reference']}\n\n"
    with open(os.path.join(output_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(header + table)
    return table


# --- the command ---------------------------------------------------------------------------


def run(cfg: DictConfig, output_dir: str) -> dict:
    """Evaluates what a composed eval config describes; writes the eval folder; returns the result."""
    import dataclasses

    from .run_checks import typed

    model_cfg = typed(cfg, "model", ModelConfig)
    data_cfg = typed(cfg, "data", DataConfig)
    settings = typed(cfg, "eval", EvalSettings)
    method = OmegaConf.to_container(cfg.method, resolve=True) if cfg.get("method") else {}
    reward = OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") else None
    models = [m.strip() for m in str(model_cfg.name_or_path).split(",") if m.strip()]
    name = method.get("name")
    if name == "rm":
        if reward:
            raise AlignError(
                "method=rm evaluates the reward models named by model.name_or_path: drop the reward settings"
            )
        result = evaluate_reward_models(
            models, data_cfg, str(method.get("mode", "pairwise")), method.get("sample"), settings.batch_size
        )
    elif name in (None, "ppo", "grpo"):
        result = evaluate_policies(
            models,
            data_cfg,
            reward,
            settings.reference,
            settings,
            dataclasses.replace(model_cfg, name_or_path="tiny"),
            output_dir,
            int(cfg.get("seed", 42)),
            method.get("sample"),
        )
    else:
        raise AlignError(
            f"align eval takes no method={name}: leave method out to evaluate policies on prompts "
            "(method=ppo or grpo for their sample prompts), or use method=rm for reward models"
        )
    table = write_outputs(result, output_dir)
    print(f"align: eval ({result['kind']}) on {result['data']}, {result['rows']} rows -> {output_dir}")
    print(table, end="", flush=True)
    return result


EVAL_USAGE = """usage: align eval model.name_or_path=<model>[,<model>...] [reward=<option> ...] [data.path=<file>] [eval.<key>=<value>]
       align eval method=rm [method.mode=pairwise|pointwise|listwise] model.name_or_path=<rm run> data.path=<file>

Policies: every model answers every prompt of data.path (greedy and sampled); the table has the
mean reward under `reward=` (model, length, keyword, match, format, function, mix), the win rate
and KL against eval.reference, the length, distinct-1/2 and the share of identical completions
across prompts. Reward models (method=rm): accuracy and margin (pairwise), Kendall tau and top-1
(listwise), MSE, Pearson and Spearman (pointwise), as training evaluates them.

Writes eval.json, eval.md and samples.jsonl to outputs/eval/<time>/ (or hydra.run.dir=<folder>).

settings (eval.*): reference, max_new_tokens (32), temperature (1.0), top_p (1.0), num_samples (1),
batch_size (16), greedy (true), sampled (true)

examples:
  align eval model.name_or_path=outputs/ppo/<run>,outputs/sft/<run> reward=model \\
      reward.model.path=outputs/rm/<run> data.path=heldout_prompts.jsonl eval.reference=outputs/sft/<run>
  align eval method=rm model.name_or_path=outputs/rm/<run> data.path=heldout_pairs.jsonl
"""


def _models_override(argv: list[str]) -> list[str]:
    """`model.name_or_path=a,b,c` as one quoted string (Hydra would read a comma list as a sweep)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "model.name_or_path" and "," in value and value[:1] not in "'\"":
            arg = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out


def main(argv: list[str]) -> None:
    """Entry for `align eval [overrides]`."""
    from .errors import fail, wants_debug
    from .preflight import check_repeated_keys, compose_checked, unique_dir

    if {"-h", "--help"} & set(argv):
        print(EVAL_USAGE)
        return
    argv = _models_override(schema.normalize_overrides(list(argv)))
    try:
        check_repeated_keys(argv)
        register()
        cfg = compose_checked(argv, return_hydra_config=True, config_name="eval")
        output_dir = str(cfg.output_dir) if cfg.get("output_dir") else unique_dir(str(cfg.hydra.run.dir))
        os.makedirs(os.path.join(output_dir, ".hydra"), exist_ok=True)
        saved = OmegaConf.to_container(cfg)
        saved.pop("hydra", None)  # the run folder is chosen; the config saved is the user's part
        OmegaConf.save(OmegaConf.create(saved), os.path.join(output_dir, ".hydra", "config.yaml"))
        OmegaConf.save(OmegaConf.create(list(argv)), os.path.join(output_dir, ".hydra", "overrides.yaml"))
        run(cfg, output_dir)
    except AlignError as err:
        if wants_debug(argv):
            raise
        fail(err)
    except KeyboardInterrupt:
        print("\nalign: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
