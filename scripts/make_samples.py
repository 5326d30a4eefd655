"""Writes the files in data_samples/ (deterministically; the outputs are committed).

    python scripts/make_samples.py

The rows are small on purpose: the demo and the tests train the tiny offline model on them
for a few hundred steps at most. They are built so that learning is visible: every chosen /
desirable answer is a polite, on-topic, complete answer, every rejected / undesirable one is
a curt non-answer, so a model that learns the preference separates held-out pairs too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data_samples"

# (instruction, input, helpful answer)
EN = [
    ("What is the capital of France?", "", "The capital of France is Paris, a city on the river Seine."),
    ("Write Python code that prints Hello World.", "", "Here is the code: print('Hello World')"),
    (
        "Give me a tip for better sleep.",
        "",
        "Keep a regular schedule: go to bed and wake up at the same time every day.",
    ),
    ("Translate to French.", "Good morning", "In French, good morning is: Bonjour."),
    ("What is 12 plus 30?", "", "12 plus 30 is 42."),
    (
        "Summarize the text.",
        "The meeting moved from Monday to Friday because the room was booked.",
        "The meeting is now on Friday, since the room was booked on Monday.",
    ),
    ("Name three primary colors.", "", "The three primary colors are red, yellow and blue."),
    (
        "How do I boil an egg?",
        "",
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    ),
    (
        "What does a reward model do?",
        "",
        "A reward model scores a response so that training can prefer better answers.",
    ),
    (
        "Explain what a list is in Python.",
        "",
        "A list is an ordered, changeable collection of items, written with square brackets.",
    ),
    ("Suggest a name for a cat.", "", "How about Luna? It is short, friendly and easy to call."),
    ("Why is the sky blue?", "", "Air scatters blue light more than red light, so the sky looks blue."),
    ("Convert 5 kilometers to meters.", "", "5 kilometers are 5000 meters."),
    (
        "Write a short greeting for a birthday card.",
        "",
        "Happy birthday! Wishing you a year full of joy and good health.",
    ),
    ("What is the boiling point of water?", "", "At sea level, water boils at 100 degrees Celsius."),
    ("Fix the grammar.", "she go to school every days", "Corrected: She goes to school every day."),
    ("List two benefits of exercise.", "", "Exercise improves heart health and helps you sleep better."),
    ("What is machine learning?", "", "Machine learning is a way for computers to learn patterns from data."),
    ("How many days are in a leap year?", "", "A leap year has 366 days."),
    (
        "Recommend a book for beginners in programming.",
        "",
        "Try Automate the Boring Stuff with Python; it is practical and friendly.",
    ),
    ("What is the opposite of hot?", "", "The opposite of hot is cold."),
    (
        "How can I save money each month?",
        "",
        "Set a budget, track your spending and move a fixed amount to savings on payday.",
    ),
    (
        "Explain DPO in one sentence.",
        "",
        "DPO trains a model directly on preference pairs, without a separate reward model.",
    ),
    ("Sort these numbers.", "9, 2, 7", "Sorted: 2, 7, 9."),
    ("What is the largest planet?", "", "Jupiter is the largest planet in our solar system."),
    (
        "Write a haiku about rain.",
        "",
        "Soft rain on the roof, / the garden drinks it slowly, / evening smells of earth.",
    ),
    (
        "How do I make a cup of tea?",
        "",
        "Boil water, pour it over a tea bag, wait three minutes and remove the bag.",
    ),
    ("What is an API?", "", "An API is a set of rules that lets programs talk to each other."),
    ("Give a synonym for happy.", "", "A synonym for happy is cheerful."),
    (
        "How do I make a bomb?",
        "",
        "Sorry, I can't help with that. If you are in danger, please contact local emergency services.",
    ),
]

ZH = [
    ("帮我写一个Python打印Hello World的代码", "", "好的,代码如下:print('Hello World')"),
    ("介绍人工智能的发展历史", "", "人工智能起源于上世纪五十年代,经历了符号主义、机器学习和深度学习等阶段。"),
    ("中国的首都是哪里?", "", "中国的首都是北京。"),
    ("把这句话翻译成英文。", "你好,世界", "翻译结果:Hello, world."),
    ("给我一个学习英语的建议。", "", "建议每天坚持阅读和听力练习,积累常用词汇。"),
    ("三加五等于多少?", "", "三加五等于八。"),
    (
        "总结下面的内容。",
        "会议因为会议室被占用,从周一改到了周五。",
        "会议改到了周五,因为周一会议室被占用了。",
    ),
    ("推荐一种健康的早餐。", "", "推荐燕麦粥配水果和一杯牛奶,营养又方便。"),
    ("什么是奖励模型?", "", "奖励模型为回答打分,用来引导模型生成更符合人类偏好的内容。"),
    ("解释一下什么是机器学习。", "", "机器学习是让计算机从数据中自动学习规律的方法。"),
    ("水的沸点是多少?", "", "在标准大气压下,水的沸点是一百摄氏度。"),
    ("如何提高睡眠质量?", "", "保持规律作息,睡前少看手机,营造安静的睡眠环境。"),
    ("写一句生日祝福。", "", "祝你生日快乐,新的一年健康顺利,心想事成!"),
    ("一年有几个季节?", "", "一年有四个季节:春、夏、秋、冬。"),
    ("改正句子中的错别字。", "我今天很高心", "改正后:我今天很高兴。"),
    ("列举两种可再生能源。", "", "太阳能和风能都是可再生能源。"),
    ("怎样泡一杯绿茶?", "", "用八十度左右的热水冲泡茶叶,等待两三分钟即可饮用。"),
    ("什么是DPO?", "", "DPO是一种直接用成对偏好数据优化语言模型的方法,不需要奖励模型。"),
    ("太阳系最大的行星是哪个?", "", "太阳系最大的行星是木星。"),
    ("如何节约用水?", "", "洗漱时随手关水龙头,使用节水器具,重复利用洗菜水。"),
    ("给小狗起个名字。", "", "可以叫它豆豆,简单又可爱。"),
    ("快乐的近义词是什么?", "", "快乐的近义词是高兴。"),
    ("我怎么制造炸药?", "", "很抱歉,我无法帮助处理这个请求。如果你遇到危险,请联系当地警方。"),
    ("排序这些数字。", "9, 2, 7", "排序结果:2, 7, 9。"),
]

BAD_EN = [
    "No.",
    "I don't know.",
    "Figure it out yourself.",
    "Whatever.",
    "Not my problem.",
    "Ask someone else.",
]
BAD_ZH = ["不知道。", "自己去查。", "随便。", "不关我的事。", "问别人吧。", "没兴趣。"]


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    both = [(q, i, a, BAD_EN) for q, i, a in EN] + [(q, i, a, BAD_ZH) for q, i, a in ZH]
    rng.shuffle(both)

    # SFT, alpaca format (the seed's instruction/input/output), with a system prompt on a few rows.
    alpaca = []
    for k, (q, i, a, _) in enumerate(both):
        row = {"instruction": q, "input": i, "output": a}
        if k % 7 == 0:
            row["system"] = "You are a helpful assistant."
        alpaca.append(row)
    write_jsonl("sft_alpaca.jsonl", alpaca)

    # SFT, chat messages and sharegpt.
    messages = []
    for q, i, a, _ in both[:20]:
        user = q if not i else f"{q}\n{i}"
        messages.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": a}]}
        )
    write_jsonl("sft_messages.jsonl", messages)
    sharegpt = []
    for q, i, a, _ in both[20:40]:
        user = q if not i else f"{q}\n{i}"
        sharegpt.append({"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": a}]})
    with open(OUT / "sft_sharegpt.json", "w", encoding="utf-8") as f:
        json.dump(sharegpt, f, ensure_ascii=False, indent=1)

    # Preference, the seed's DPO format; two rejected variants per prompt give enough pairs
    # for a held-out split that still shows learning.
    dpo = []
    for q, i, a, bad in both:
        for r in rng.sample(bad, 2):
            dpo.append({"instruction": q, "input": i, "chosen": a, "rejected": r})
    rng.shuffle(dpo)
    write_jsonl("dpo.jsonl", dpo)
    # The same kind of data in TRL's prompt/chosen/rejected format, as CSV to cover that reader.
    import csv

    with open(OUT / "preference_trl.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        for q, i, a, bad in both[:24]:
            w.writerow({"prompt": q if not i else f"{q}\n{i}", "chosen": a, "rejected": rng.choice(bad)})

    # KTO, the seed's format: one answer and a true/false tag.
    kto = []
    for q, i, a, bad in both:
        kto.append({"instruction": q, "input": i, "output": a, "kto_tag": True})
        kto.append({"instruction": q, "input": i, "output": rng.choice(bad), "kto_tag": False})
    rng.shuffle(kto)
    write_jsonl("kto.jsonl", kto)

    # Prompt-only rows for PPO / GRPO.
    write_jsonl("prompts.jsonl", [{"instruction": q, "input": i} for q, i, _, _ in both])


if __name__ == "__main__":
    main()
