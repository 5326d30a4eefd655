"""Reward models (seed section 2.2) in the seed's three modes.

    align train method=rm                                    # pairwise (对比式), data_samples/dpo.jsonl
    align train method=rm method.mode=pointwise [method.normalize=zscore]   # 打分式
    align train method=rm method.mode=listwise [peft=lora]                  # 排序式

Data, by mode (`method.dataset_type` follows `method.mode`, see `Settings`):

- pairwise (`preference`): the seed's `instruction`/`input`/`chosen`/`rejected` or TRL's
  `prompt`/`chosen`/`rejected`, with an optional `margin` column (a row without one has 0).
  Loss −log σ(r(x,y+) − r(x,y−) − margin): TRL's RewardTrainer, evaluated over the whole split.
- pointwise (`pointwise`): `prompt`/`completion`/`score` (the seed's example) or
  `instruction`/`input`/`output`/`score`. Loss: MSE between r(x,y) and the score, after the
  optional normalisation `method.normalize` (none | minmax | zscore, fitted on the train split;
  the fit is written to `score_normalization.json` in the run folder and to the model config).
- listwise (`listwise`): `instruction`/`input`/`responses` best first, or TRL-style
  `prompt`/`completions` (+ optional `ranking`, 0 = best), K ≥ 2 responses, K may vary.
  Loss: per prompt, the mean over its C(K,2) ordered pairs of −log σ(r(x,y_better) −
  r(x,y_worse)), then the mean over prompts. All K responses of a prompt share a batch, and
  `per_device_train_batch_size` counts prompts.

Every mode evaluates on the held-out split, every metric over the whole split (logged during
training and in summary.json): `eval_accuracy` and `eval_margin` on the pairs the data implies
(pointwise: two responses to one prompt with different scores; none, no such metrics), plus
`eval_mse`, `eval_pearson`, `eval_spearman` (pointwise) or `eval_kendall_tau`,
`eval_top1_accuracy` (listwise); see rm_metrics.py.

The run folder holds a sequence-classification model with one output, with its tokenizer
and chat template and `pad_token_id` in its config (with `peft=lora`: an adapter that also
saves the score head). `reward.model.path=<run folder>` uses it in PPO and GRPO;
`AutoModelForSequenceClassification.from_pretrained(<run folder>)` loads it (add
`num_labels=1` for an adapter: its base model's config does not say one output).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..config import MethodSettings, one_of
from ..errors import AlignError

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
# mode -> the dataset type it reads (data/formats.py), and the sample file read without data.path.
MODES = {"pairwise": "preference", "pointwise": "pointwise", "listwise": "listwise"}
SAMPLES = {
    "pairwise": "dpo.jsonl",  # instruction/input/chosen/rejected, English and Chinese
    # prompt/completion/score (the seed's style); rm_pointwise_alpaca.jsonl: instruction/input/output/score
    "pointwise": "rm_pointwise.jsonl",
    # instruction/input/responses best first, K = 2..4; rm_listwise_trl.jsonl: prompt/completions/ranking
    "listwise": "rm_listwise.jsonl",
}
NORMALIZATIONS = ("none", "minmax", "zscore")  # of pointwise score targets (rm_losses.fit_normalizer)


@dataclass
class Settings(MethodSettings):
    """`method=rm`: the mode, the pointwise normalisation; the dataset type and sample follow the mode."""

    name: str = "rm"
    # pairwise: chosen/rejected (+margin) | pointwise: a score per response | listwise: K responses best first
    mode: str = "pairwise"
    normalize: str = (
        "none"  # pointwise targets: none | minmax (to [0, 1]) | zscore; fitted on the train split
    )
    dataset_type: str | None = None  # null: the mode's (pairwise: preference, pointwise, listwise)
    sample: str | None = None  # null: the mode's sample file (SAMPLES)

    def __post_init__(self):
        one_of("mode", self.mode, MODES)
        one_of("normalize", self.normalize, NORMALIZATIONS)
        wanted = MODES[self.mode]
        if self.dataset_type is None:
            self.dataset_type = wanted
        elif self.dataset_type != wanted:
            raise AlignError(
                f"method.mode={self.mode} reads {wanted} data, but method.dataset_type={self.dataset_type!r}: "
                "leave method.dataset_type unset (it follows the mode)"
            )
        if self.sample is None:
            self.sample = SAMPLES[self.mode]
        super().__post_init__()


def config_class():
    """The TRL config dataclass that `method.args` fills."""
    from trl import RewardConfig

    return RewardConfig


def check(ctx, rows: list[dict] | None) -> list[str]:
    """What is wrong with the mode's settings, and (given the training rows) with the data they
    need: every check of this method that needs no weights (`align data validate` runs it too)."""
    from .rm_losses import fit_normalizer

    # `Settings` has checked the mode and the normalisation's name when the config was composed.
    mode, normalize = ctx.method["mode"], ctx.method["normalize"]
    problems = []
    if mode != "pointwise" and normalize != "none":
        problems.append(
            f"method.normalize={normalize} rescales pointwise scores; method.mode={mode} has none "
            "(use method.mode=pointwise or drop method.normalize)"
        )
    elif mode == "pointwise" and rows:
        try:
            fit_normalizer([r["score"] for r in rows], normalize)
        except AlignError as err:
            problems.append(str(err))
    center = ctx.args.get("center_rewards_coefficient")
    if mode == "pointwise" and center is not None:
        problems.append(
            "method.args.center_rewards_coefficient pulls rewards toward 0, against the scores the "
            "pointwise loss fits; use method.normalize=zscore to center the targets instead"
        )
    return problems


def _fill_missing_margins(dataset):
    """A preference file may give a margin on some rows only; the others mean margin 0."""
    if dataset is None or "margin" not in dataset.column_names:
        return dataset
    if all(m is not None for m in dataset["margin"]):
        return dataset
    return dataset.map(lambda row: {"margin": 0.0 if row["margin"] is None else float(row["margin"])})


def _restore_head_dtype(model) -> None:
    """Puts the trainable copy of the score head back in the dtype the model computes in.

    Under quantization RewardTrainer casts every trainable parameter to bfloat16 (QLoRA's
    recipe). LoRA layers cast their input to match, but PEFT's trainable copy of the score head
    (`modules_to_save`) is a plain Linear, so on a float32 base (any CPU run) the forward fails
    with a dtype mismatch. Giving the head back its original dtype fixes that and keeps the
    reward head at full precision; it runs before the optimizer exists.
    """
    for module in model.modules():
        original = getattr(module, "original_module", None)
        copies = getattr(module, "modules_to_save", None)
        if original is None or copies is None:
            continue
        dtype = next(original.parameters()).dtype
        for copy in copies.values():
            for param in copy.parameters():
                if param.dtype != dtype and param.is_floating_point():
                    param.data = param.data.to(dtype)


def _normalized_scores(ctx, train, evaluation):
    """Fits `method.normalize` on the train scores and maps both splits; writes the fit down."""
    from .rm_losses import fit_normalizer

    normalizer = fit_normalizer(train["score"], ctx.method["normalize"])
    if normalizer.method != "none":
        log.info("rm: scores normalised with %s", normalizer.as_dict())
        train = train.map(lambda row: {"score": normalizer(row["score"])})
        if evaluation is not None:
            evaluation = evaluation.map(lambda row: {"score": normalizer(row["score"])})
    # In the run folder (also beside a LoRA adapter, which has no config.json of its own), so
    # rewards can be mapped back to the original score scale: score = reward * scale + shift.
    os.makedirs(ctx.output_dir, exist_ok=True)
    with open(os.path.join(ctx.output_dir, "score_normalization.json"), "w", encoding="utf-8") as f:
        json.dump(normalizer.as_dict(), f)
    return train, evaluation, normalizer


def build(ctx):
    from .rm_trainer import ListwiseRewardTrainer, PairwiseRewardTrainer, PointwiseRewardTrainer

    # `Settings` and `check` (run by train.py before any model loads) have vetted the settings and the data.
    mode = ctx.method["mode"]
    args = ctx.trl_config(config_class())
    train, evaluation = ctx.train_dataset, ctx.eval_dataset
    if mode == "pairwise":
        trainer_cls = PairwiseRewardTrainer
        train, evaluation = _fill_missing_margins(train), _fill_missing_margins(evaluation)
    elif mode == "pointwise":
        trainer_cls = PointwiseRewardTrainer
        train, evaluation, normalizer = _normalized_scores(ctx, train, evaluation)
    else:
        trainer_cls = ListwiseRewardTrainer

    model = ctx.load_model(kind="seq_cls")
    if mode == "pointwise":
        model.config.score_normalization = normalizer.as_dict()  # saved in config.json too
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=ctx.tokenizer,
        peft_config=ctx.lora("SEQ_CLS"),
        callbacks=ctx.callbacks,
    )
    _restore_head_dtype(trainer.model)
    return trainer
