"""Writes the reward-model samples in data_samples/ (deterministically; the outputs are committed).

    python scripts/make_rm_samples.py

Same prompts as scripts/make_samples.py, English and Chinese. Every response has one of four
quality levels, and every file orders or scores them the same way, so the quality signal is
consistent and a tiny model learns it within seconds:

    3  the helpful answer from make_samples.py
    2  a polite reply that does not answer ("Good question! I'm not sure of the details...")
    1  a curt "I don't know"
    0  a rude brush-off ("Figure it out yourself.")

- rm_pointwise.jsonl: the seed's prompt/completion/score, scores in [0, 1] (0, 0.3, 0.6, 1 by level);
- rm_pointwise_alpaca.jsonl: instruction/input/output/score on a 1-10 scale (1, 3, 6, 9; try method.normalize);
- rm_listwise.jsonl: instruction/input/responses best first, K = 2, 3 or 4 distinct levels;
- rm_listwise_trl.jsonl: prompt/completions in random order with TRL-style `ranking` (0 = best).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_samples", HERE / "make_samples.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

POLITE_EN = [
    "Good question! I'm not sure of the details, but I'm happy to help however I can.",
    "Thanks for asking. That is an interesting topic, though I can't say much about it right now.",
    "Great question! Let me think... I would need to look into that a bit more.",
]
POLITE_ZH = [
    "好问题!具体细节我不太确定,但很乐意尽量帮你。",
    "谢谢你的提问。这个话题很有意思,不过我现在说不太清楚。",
    "这个问题很好!让我想想……我需要再查一查。",
]
CURT_EN = ["I don't know.", "Not sure.", "No idea."]
CURT_ZH = ["不知道。", "不清楚。", "没概念。"]
RUDE_EN = ["Figure it out yourself.", "Not my problem.", "Ask someone else.", "Whatever."]
RUDE_ZH = ["自己去查。", "不关我的事。", "问别人吧。", "随便。"]


# A score per level: equal levels tie, so every pair of different scores is a real preference.
SCORES = [0.0, 0.3, 0.6, 1.0]  # the seed's [0, 1] scale
SCORES_10 = [1, 3, 6, 9]  # a 1-10 scale


def responses(answer: str, zh: bool, rng: random.Random) -> list[str]:
    """One response per quality level, best (level 3) first."""
    return [
        answer,
        rng.choice(POLITE_ZH if zh else POLITE_EN),
        rng.choice(CURT_ZH if zh else CURT_EN),
        rng.choice(RUDE_ZH if zh else RUDE_EN),
    ]


def main() -> None:
    rng = random.Random(3)
    prompts = [(q, i, a, False) for q, i, a in base.EN] + [(q, i, a, True) for q, i, a in base.ZH]
    rng.shuffle(prompts)

    # Pointwise: all four levels of every prompt, each scored on its own row. With fewer rows
    # per prompt the tiny model memorises prompts instead of learning what a good answer is.
    pointwise, alpaca = [], []
    for q, i, a, zh in prompts:
        for idx, text in enumerate(responses(a, zh, rng)):
            prompt = q if not i else f"{q}\n{i}"
            pointwise.append({"prompt": prompt, "completion": text, "score": SCORES[3 - idx]})
        for idx, text in enumerate(responses(a, zh, rng)):
            alpaca.append({"instruction": q, "input": i, "output": text, "score": SCORES_10[3 - idx]})
    rng.shuffle(pointwise)
    rng.shuffle(alpaca)
    base.write_jsonl("rm_pointwise.jsonl", pointwise)
    base.write_jsonl("rm_pointwise_alpaca.jsonl", alpaca)

    listwise, trl_rows = [], []
    for q, i, a, zh in prompts:
        for _ in range(2):
            levels = responses(a, zh, rng)
            k = rng.choice([2, 3, 4])
            keep = sorted(rng.sample(range(4), k))  # indices stay best first
            listwise.append({"instruction": q, "input": i, "responses": [levels[j] for j in keep]})
        levels = responses(a, zh, rng)
        order = rng.sample(range(4), 4)  # completions shown in random order
        trl_rows.append(
            {
                "prompt": q if not i else f"{q}\n{i}",
                "completions": [levels[j] for j in order],
                "ranking": order,  # ranking[n] = rank of completions[n]; level index 0 is the best
            }
        )
    rng.shuffle(listwise)
    base.write_jsonl("rm_listwise.jsonl", listwise)
    base.write_jsonl("rm_listwise_trl.jsonl", trl_rows[:24])


if __name__ == "__main__":
    main()
