"""Reward models (seed section 2.2) in the seed's three modes.

    align train method=rm                                    # pairwise (对比式), data_samples/dpo.jsonl
    align train method=rm method.mode=pointwise [method.normalize=zscore]   # 打分式
    align train method=rm method.mode=listwise [peft=lora]                  # 排序式

Data, by mode (`method.format` follows `method.mode`, see conf/method/rm.yaml):

- pairwise (`preference`): the seed's `instruction`/`input`/`chosen`/`rejected` or TRL's
  `prompt`/`chosen`/`rejected`, with an optional `margin` column (a row without one has 0).
  Loss −log σ(r(x,y+) − r(x,y−) − margin): TRL's RewardTrainer as it is.
- pointwise (`pointwise`): `prompt`/`completion`/`score` (the seed's example) or
  `instruction`/`input`/`output`/`score`. Loss: MSE between r(x,y) and the score, after the
  optional normalisation `method.normalize` (none | minmax | zscore, fitted on the train split;
  the fitted map is stored in the model config as `score_normalization`).
- listwise (`listwise`): `instruction`/`input`/`responses` best first, or TRL-style
  `prompt`/`completions` (+ optional `ranking`, 0 = best), K ≥ 2 responses, K may vary.
  Loss: per prompt, the mean over its C(K,2) ordered pairs of −log σ(r(x,y_better) −
  r(x,y_worse)), then the mean over prompts. All K responses of a prompt share a batch, and
  `per_device_train_batch_size` counts prompts.

Every mode evaluates on the held-out split (logged during training and in summary.json):
`eval_accuracy` and `eval_margin` on the pairs the data implies, plus `eval_mse`,
`eval_pearson`, `eval_spearman` (pointwise) or `eval_kendall_tau`, `eval_top1_accuracy`
(listwise); see rm_metrics.py.

The run folder holds a sequence-classification model with one output, with its tokenizer
and chat template and `pad_token_id` in its config (with `peft=lora`: an adapter that also
saves the score head). `reward.model.path=<run folder>` uses it in PPO and GRPO;
`AutoModelForSequenceClassification.from_pretrained(<run folder>)` loads a full model, and
`peft.AutoPeftModelForSequenceClassification.from_pretrained(<run folder>, num_labels=1)` an
adapter.
"""

from __future__ import annotations

import json
import logging
import os

from ..errors import AlignError, nearest

log = logging.getLogger("align")

SUMMARY_KEYS = [
    "eval_accuracy",
    "eval_margin",
    "eval_mse",
    "eval_pearson",
    "eval_spearman",
    "eval_kendall_tau",
    "eval_top1_accuracy",
    "accuracy",
    "margin",
]
# mode -> the data layer's standard format it reads.
MODES = {"pairwise": "preference", "pointwise": "pointwise", "listwise": "listwise"}


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import RewardConfig

    return RewardConfig


def check_mode(method: dict) -> str:
    """The validated `method.mode`, which must agree with `method.format`.

    Raises:
        AlignError: an unknown mode, or a format that is not the mode's.
    """
    mode = method.get("mode", "pairwise")
    if mode not in MODES:
        raise AlignError(
            f"method.mode={mode!r} is not valid: use one of {', '.join(MODES)}{nearest(mode, MODES)}"
        )
    if method.get("format") != MODES[mode]:
        raise AlignError(
            f"method.mode={mode} reads {MODES[mode]} data, but method.format={method.get('format')!r}: "
            "leave method.format unset (conf/method/rm.yaml derives it from the mode)"
        )
    return mode


def _fill_missing_margins(dataset):
    """A preference file may give a margin on some rows only; the others mean margin 0."""
    if dataset is None or "margin" not in dataset.column_names:
        return dataset
    if all(m is not None for m in dataset["margin"]):
        return dataset
    return dataset.map(lambda row: {"margin": 0.0 if row["margin"] is None else float(row["margin"])})


def build(ctx):
    from .rm_losses import fit_normalizer
    from .rm_trainer import ListwiseRewardTrainer, PointwiseRewardTrainer, RewardTrainer

    mode = check_mode(ctx.method)
    args = ctx.trl_config(config_class())
    train, evaluation = ctx.train_dataset, ctx.eval_dataset
    model = ctx.load_model(kind="seq_cls")
    if mode == "pairwise":
        trainer_cls = RewardTrainer
        train, evaluation = _fill_missing_margins(train), _fill_missing_margins(evaluation)
    elif mode == "pointwise":
        trainer_cls = PointwiseRewardTrainer
        if args.center_rewards_coefficient is not None:
            raise AlignError(
                "method.args.center_rewards_coefficient pulls rewards toward 0, against the scores the "
                "pointwise loss fits; use method.normalize=zscore to center the targets instead"
            )
        normalizer = fit_normalizer(train["score"], str(ctx.method.get("normalize", "none")))
        if normalizer.method != "none":
            train = train.map(lambda row: {"score": normalizer(row["score"])})
            if evaluation is not None:
                evaluation = evaluation.map(lambda row: {"score": normalizer(row["score"])})
            log.info("rm: scores normalised with %s", normalizer.as_dict())
        # Saved in config.json (full models), so a user can map rewards back to the score scale.
        model.config.score_normalization = normalizer.as_dict()
        if ctx.peft_cfg.method != "none":
            os.makedirs(ctx.output_dir, exist_ok=True)
            with open(os.path.join(ctx.output_dir, "score_normalization.json"), "w", encoding="utf-8") as f:
                json.dump(normalizer.as_dict(), f)
    else:
        trainer_cls = ListwiseRewardTrainer

    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=ctx.tokenizer,
        peft_config=ctx.lora("SEQ_CLS"),
        callbacks=ctx.callbacks,
    )
