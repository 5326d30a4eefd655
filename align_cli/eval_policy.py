"""`align eval` for policies: each model answers every prompt (greedy and sampled), scored by
the configured reward, against a reference (win rate, KL), with length and diversity figures.

Heavy imports (torch, transformers) stay inside the functions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from .config import DataConfig, ModelConfig
from .errors import AlignError
from .eval_tables import json_number

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
                            row["reward"] = json_number(rewards["total"][i])
                        if other is not None:
                            row["reference_completion"] = other[0].texts[i]
                            if funcs:
                                row["reference_reward"] = json_number(other[1]["total"][i])
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
