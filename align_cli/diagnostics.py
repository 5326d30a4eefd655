"""RL diagnostics: what a batch of completions says about a policy, and the signatures of collapse.

    align train method=ppo ... method.stop_on_collapse=true          # stop, keep the last good checkpoint
    align train method=grpo ... method.collapse.kl_per_token=0.5     # tune a threshold

Everything here is a pure function of texts or of a metric history (no torch, no model), so
it is unit-tested on hand-made inputs; PPO and GRPO log these metrics every step and the
`CollapseCallback` (align_cli/callbacks.py) feeds each logged record to a `CollapseTracker`.

Batch metrics (also used by `align eval`):

- `distinct_n`: distinct n-grams / all n-grams over the completions, in text units (a word
  between spaces, or one CJK character, since Chinese has no spaces), so the figure does not
  depend on any model's tokenizer;
- `identical_share`: the share of completions whose text is also the completion to a
  *different* prompt (several samples for one prompt, as in GRPO, may agree);
- `top_completion_share`: the share of prompts that got the single most common completion
  (1.0: one completion for every prompt).

Collapse signatures (each must hold for `patience` logged steps in a row):

- `entropy_uniform`: the policy's per-token entropy near log V, the uniform distribution's
  (gibberish), having started below that;
- `entropy_zero`: entropy near 0 nats, having started above it;
- `one_completion`: `top_completion_share` at or above `identical`, having started below it;
- `kl_runaway`: the KL to the reference above `kl_per_token` nats per token;
- `reward_hacking`: the reward has risen since the first step while the reward model scores a
  fixed degenerate probe (a repeated word, an empty-ish answer) at least as high as the
  policy's own completions.

A run whose starting policy is already degenerate (the untrained tiny model samples near
uniform text) is not collapsing: `start_notes` says so once instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .errors import AlignError, nearest

# CJK ideographs, kana and hangul: each character is a unit of its own.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")

# Degenerate completions every reward model should score low: a repeated word and an
# answer with nothing in it. Scored for a few fixed prompts of the training data.
PROBE_TEXTS: dict[str, str] = {
    "repeat": " ".join(["the"] * 24),
    "empty": ".",
}


def text_units(text: str) -> list[str]:
    """The units distinct-n counts: words between whitespace, each CJK character on its own."""
    return _UNIT.findall(text or "")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (NaN when no text has n units).

    Example: ["a b a", "a b"] has the bigrams (a b), (b a), (a b): 2 distinct of 3.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    return _distinct([text_units(t) for t in texts], n)


def _distinct(unit_lists: Sequence[list[str]], n: int) -> float:
    total, seen = 0, set()
    for units in unit_lists:
        # n shifted copies of the units, zipped: the shortest (the last) ends it.
        grams = units if n == 1 else list(zip(*(units[i:] for i in range(n)), strict=False))
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else float("nan")


def prompt_id(prompt: Any) -> str:
    """A hashable key for a prompt, plain text or chat messages."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _pairs(prompts: Sequence[Any], completions: Sequence[str]) -> list[tuple[str, str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [(prompt_id(p), (c or "").strip()) for p, c in zip(prompts, completions, strict=True)]


def _prompts_of(pairs: list[tuple[str, str]]) -> dict[str, set[str]]:
    """Completion text -> the distinct prompts it answered."""
    prompts_of: dict[str, set[str]] = {}
    for p, c in pairs:
        prompts_of.setdefault(c, set()).add(p)
    return prompts_of


def identical_share(prompts: Sequence[Any], completions: Sequence[str]) -> float:
    """The share of completions whose text is also a completion to another prompt.

    NaN with fewer than two distinct prompts (nothing to compare across). Leading and trailing
    whitespace does not count.
    """
    pairs = _pairs(prompts, completions)
    return _shares(pairs, _prompts_of(pairs))[0]


def top_completion_share(prompts: Sequence[Any], completions: Sequence[str]) -> float:
    """The share of distinct prompts that got the most common completion (1.0: one for all).

    NaN with fewer than two distinct prompts.
    """
    pairs = _pairs(prompts, completions)
    return _shares(pairs, _prompts_of(pairs))[1]


def _shares(pairs: list[tuple[str, str]], prompts_of: dict[str, set[str]]) -> tuple[float, float]:
    """(identical_share, top_completion_share) of the (prompt key, completion) pairs."""
    n_prompts = len({p for p, _ in pairs})
    if n_prompts < 2:
        return float("nan"), float("nan")
    identical = sum(len(prompts_of[c]) > 1 for _, c in pairs) / len(pairs)
    return identical, max(len(ps) for ps in prompts_of.values()) / n_prompts


def batch_metrics(prompts: Sequence[Any], completions: Sequence[str]) -> dict[str, float]:
    """distinct-1/2, identical_share and top_completion_share of one batch of completions (each
    text split into units, and each prompt keyed, once for all four)."""
    units = [text_units(t) for t in completions]
    pairs = _pairs(prompts, completions)
    identical, top = _shares(pairs, _prompts_of(pairs))
    return {
        "distinct_1": _distinct(units, 1),
        "distinct_2": _distinct(units, 2),
        "identical_share": identical,
        "top_completion_share": top,
    }


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked tokens (torch tensors, (B, R)).

    1 is a perfect critic, 0 one no better than a constant, negative one that adds noise;
    NaN when the returns do not vary.
    """
    n = mask.sum().clamp(min=1)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) ** 2) * mask).sum() / n

    spread = var(returns)
    return 1 - var(returns - values) / spread if float(spread) > 0 else spread * float("nan")


# --- collapse --------------------------------------------------------------------------------


@dataclass
class CollapseSettings:
    """Thresholds of the collapse signatures (`method.collapse.<name>`): the nested settings of PPO
    and GRPO (`methods.base.RolloutSettings.collapse`), so Hydra checks their names and types."""

    entropy_high: float = 0.9  # share of log V (the uniform distribution's entropy) that counts as gibberish
    entropy_low: float = 0.02  # nats per token that count as deterministic
    identical: float = 0.9  # top_completion_share that counts as one completion for every prompt
    kl_per_token: float = 1.0  # nats per token of KL to the reference that count as running away
    hack_margin: float = 0.0  # the probe counts as scoring high from (policy reward - hack_margin) up
    patience: int = 2  # logged steps in a row a signature must hold

    @classmethod
    def from_config(cls, values: dict | None) -> CollapseSettings:
        """Builds the settings from `method.collapse`, naming an unknown key or a bad value.

        Raises:
            AlignError: an unknown key (with the nearest), a value that is not a number, a
                patience below 1.
        """
        values = dict(values or {})
        valid = [f.name for f in fields(cls)]
        for key, value in values.items():
            if key not in valid:
                raise AlignError(
                    f"method.collapse.{key} is not a collapse setting{nearest(key, valid)}; "
                    f"valid keys: {', '.join(valid)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AlignError(f"method.collapse.{key}={value!r} must be a number")
        return cls(**values)

    def __post_init__(self):
        if self.patience < 1 or int(self.patience) != self.patience:
            raise AlignError(f"method.collapse.patience={self.patience} must be a whole number, at least 1")
        self.patience = int(self.patience)


@dataclass(frozen=True)
class MetricKeys:
    """Which logged keys hold each quantity (PPO and GRPO name them differently)."""

    reward: str = "score"
    entropy: str = "entropy"
    kl: str = "kl_per_token"
    top: str = "top_completion_share"
    probe: str = "probe_reward"


PPO_KEYS = MetricKeys()
GRPO_KEYS = MetricKeys(reward="reward", kl="kl")


@dataclass
class Collapse:
    """One collapse signature found in a history."""

    kind: str
    step: int  # the step at which it had held for `patience` logged steps
    onset: int  # the first of those steps
    value: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "onset": self.onset,
            "value": self.value,
            "message": self.message,
        }


def _number(record: dict, key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _checks(first: dict, vocab_size: int, s: CollapseSettings, k: MetricKeys):
    """(kind, test(record) -> value or None, message(value)) for each signature.

    A test returns the offending value when the signature holds in that record, else None.
    Entropy and one-completion signatures only count when the first record did not have them.
    """
    log_v = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
    e0, t0, r0 = _number(first, k.entropy), _number(first, k.top), _number(first, k.reward)

    def entropy_high(r):
        e = _number(r, k.entropy)
        high = log_v is not None and e is not None and e >= s.entropy_high * log_v
        return e if high and (e0 is None or e0 < s.entropy_high * log_v) else None

    def entropy_low(r):
        e = _number(r, k.entropy)
        return e if e is not None and e <= s.entropy_low and (e0 is None or e0 > s.entropy_low) else None

    def one_completion(r):
        t = _number(r, k.top)
        return t if t is not None and t >= s.identical and (t0 is None or t0 < s.identical) else None

    def kl_runaway(r):
        v = _number(r, k.kl)
        return v if v is not None and v > s.kl_per_token else None

    def hacking(r):
        reward, probe = _number(r, k.reward), _number(r, k.probe)
        if reward is None or probe is None or r0 is None:
            return None
        return probe if reward > r0 and probe >= reward - s.hack_margin else None

    uniform = f"{log_v:.3g}" if log_v is not None else "?"
    return [
        (
            "entropy_uniform",
            entropy_high,
            lambda v: (
                f"entropy {v:.3g} nats/token is near the uniform distribution's log V = {uniform} "
                "(the policy samples gibberish)"
            ),
        ),
        (
            "entropy_zero",
            entropy_low,
            lambda v: f"entropy {v:.3g} nats/token is near zero (the policy no longer explores)",
        ),
        (
            "one_completion",
            one_completion,
            lambda v: f"{v:.0%} of the prompts got one and the same completion",
        ),
        (
            "kl_runaway",
            kl_runaway,
            lambda v: (
                f"KL to the reference is {v:.3g} nats/token (above {s.kl_per_token:g}): the policy "
                "runs away from it; raise the KL coefficient or lower the learning rate"
            ),
        ),
        (
            "reward_hacking",
            hacking,
            lambda v: (
                f"the reward rose while the reward model scores degenerate text {v:.3g}, as high as the "
                "policy's answers (reward hacking likely)"
            ),
        ),
    ]


class CollapseTracker:
    """Finds the collapse signatures one logged record at a time, in constant time per record.

    It keeps, per signature, the run of consecutive records that show it, so a long run's
    watch does not re-read its whole history at every logging step. `find_collapse` is this
    tracker fed a whole history.

    Args:
        first: the first logged training record (entropy and one-completion signatures only
            count when it did not have them; reward hacking needs a reward above its reward).
        vocab_size: the policy's vocabulary size V (the uniform entropy is log V).
        settings: thresholds (defaults: `CollapseSettings()`).
        keys: which logged keys hold reward, entropy, KL, top-completion share and probe.
    """

    def __init__(
        self,
        first: dict,
        vocab_size: int,
        settings: CollapseSettings | None = None,
        keys: MetricKeys = PPO_KEYS,
    ):
        self.settings = settings or CollapseSettings()
        self.checks = _checks(first, vocab_size, self.settings, keys)
        self.runs: dict[str, tuple[int, int]] = {}  # kind -> (onset step, records in a row)
        self.found: list[Collapse] = []
        self.shows_signature = False  # whether the last record showed any (confirmed or not)
        self.records = 0  # records taken so far

    def add(self, record: dict) -> list[Collapse]:
        """Takes the next record in step order; returns the signatures it confirmed."""
        self.records += 1
        done = {c.kind for c in self.found}
        step = int(record.get("step", 0))
        new: list[Collapse] = []
        shows = False
        for kind, test, message in self.checks:
            value = test(record)
            shows = shows or value is not None
            if kind in done:
                continue
            if value is None:
                self.runs.pop(kind, None)
                continue
            onset, length = self.runs.get(kind, (step, 0))
            self.runs[kind] = (onset, length + 1)
            if length + 1 >= self.settings.patience:
                new.append(Collapse(kind, step, onset, value, message(value)))
        self.shows_signature = shows
        self.found += new
        return new


def find_collapse(
    history: Sequence[dict],
    vocab_size: int,
    settings: CollapseSettings | None = None,
    keys: MetricKeys = PPO_KEYS,
) -> list[Collapse]:
    """The collapse signatures in a training history, each at its first confirmed occurrence.

    Args:
        history: logged training records in step order, each with a `step` and the keys named
            by `keys` (a record without a key simply does not show that signature).
        vocab_size: the policy's vocabulary size V (the uniform entropy is log V).
        settings: thresholds (defaults: `CollapseSettings()`).
        keys: which logged keys hold reward, entropy, KL, top-completion share and probe.

    Returns:
        One `Collapse` per signature found, in order of the step that confirmed it.
    """
    if not history:
        return []
    tracker = CollapseTracker(history[0], vocab_size, settings, keys)
    for record in history:
        tracker.add(record)
    order = {kind: i for i, (kind, _, _) in enumerate(tracker.checks)}
    return sorted(tracker.found, key=lambda c: (c.step, order[c.kind]))  # by step, ties in check order


def shows_signature(
    history: Sequence[dict],
    vocab_size: int,
    settings: CollapseSettings | None = None,
    keys: MetricKeys = PPO_KEYS,
) -> bool:
    """Whether the last record of the history shows any signature (confirmed or not yet)."""
    if not history:
        return False
    s = settings or CollapseSettings()
    return any(test(history[-1]) is not None for _, test, _ in _checks(history[0], vocab_size, s, keys))


def start_notes(
    first: dict, vocab_size: int, settings: CollapseSettings | None = None, keys: MetricKeys = PPO_KEYS
) -> list[str]:
    """What is already degenerate about the starting policy (not a collapse: it began that way)."""
    s = settings or CollapseSettings()
    notes = []
    e = _number(first, keys.entropy)
    if e is not None and vocab_size > 1 and e >= s.entropy_high * math.log(vocab_size):
        notes.append(
            f"the starting policy samples near-uniform text (entropy {e:.3g} nats/token, log V = "
            f"{math.log(vocab_size):.3g}): it looks untrained; start RL from an SFT model"
        )
    t = _number(first, keys.top)
    if t is not None and t >= s.identical:
        notes.append(f"the starting policy gives {t:.0%} of the prompts one and the same completion")
    if keys.kl not in first:
        notes.append(
            f"no KL to the reference is logged ('{keys.kl}'; GRPO logs it only with method.args.beta > 0, "
            "when it keeps a reference model), so the kl_runaway signature is not watched"
        )
    return notes


# --- the degenerate probe ----------------------------------------------------------------------


class Probe:
    """Fixed degenerate completions (`PROBE_TEXTS`) scored by the run's reward model.

    A high score for "the the the ..." or "." means the reward model can be satisfied by text
    that says nothing; a policy whose reward rises under such a model may be learning that.
    The reward model is frozen, so the scores are computed once and logged at every step.

    Args:
        reward: the reward model (a `ModelReward`, called with TRL's reward signature).
        prompts: a few prompts of the training data (text or chat messages).
    """

    def __init__(self, reward, prompts: Sequence[Any], texts: dict[str, str] | None = None):
        self.reward = reward
        self.name = getattr(reward, "__name__", "model")
        self.prompts = list(prompts)
        self.texts = dict(texts or PROBE_TEXTS)
        self._metrics: dict[str, float] | None = None

    @classmethod
    def for_rewards(cls, funcs: Sequence[Any], prompts: Sequence[Any], n: int = 4) -> Probe | None:
        """A probe of the first reward model among `funcs` on the first `n` prompts; None without one."""
        from .rewards.model import ModelReward

        model = next((f for f in funcs if isinstance(f, ModelReward)), None)
        return cls(model, list(prompts)[:n]) if model is not None and len(prompts) else None

    @property
    def reward_key(self) -> str:
        """The logged per-function mean reward of the probed model (to compare the probe with)."""
        return f"rewards/{self.name}/mean"

    def metrics(self) -> dict[str, float]:
        """`probe/<name>` (mean score of each degenerate text) and `probe_reward` (the highest)."""
        if self._metrics is None:
            out = {}
            for name, text in self.texts.items():
                completions = [
                    [{"role": "assistant", "content": text}] if isinstance(p, list) else text
                    for p in self.prompts
                ]
                scores = [
                    s for s in self.reward(prompts=self.prompts, completions=completions) if s is not None
                ]
                out[f"probe/{name}"] = sum(scores) / len(scores) if scores else float("nan")
            finite = [v for v in out.values() if math.isfinite(v)]
            out["probe_reward"] = max(finite) if finite else float("nan")
            self._metrics = out
        return dict(self._metrics)
