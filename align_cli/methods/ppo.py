"""Proximal Policy Optimization with a reward model and a critic (seed sections 2.3-2.4).

    align train method=ppo                                         # tiny model, the `length` rule reward
    align train method=ppo model.name_or_path=outputs/sft/<run> reward=model reward.model.path=outputs/rm/<run>
    align train method=ppo ... peft=lora quant=4bit method.args.kl_target=6    # QLoRA, adaptive KL

Data (`prompt`): the seed's `instruction`/`input`, or TRL's `prompt` (text or chat messages).
Every other column reaches the reward functions as a keyword argument.

The policy (the configured model, usually an SFT run folder) samples a response to each
prompt; the rewards (`reward=`, see align_cli/rewards: a reward model from an `rm` run folder,
rule rewards, your own functions, or a weighted mix) score it; the per-token reward is
-beta * KL(pi || pi_ref) plus the score on the last token, and PPO's clipped surrogate with a
learned critic and GAE advantages improves the policy (align_cli/ppo/). The reference pi_ref is
the starting policy (with `peft=lora`: the model with its adapter off).

`method.critic_init` picks where the critic (value model) starts:

- `auto` (default): the reward model, when the reward has exactly one and it shares the
  policy's tokenizer (InstructGPT's choice), else the policy with a new zeroed value head;
- `reward`: the reward model (an error if there is none or it has another tokenizer);
- `policy`: the policy's weights with a new zeroed value head;
- the name of a reward-model entry in a `reward` mix: that reward model.

`method.critic_head` (default `zero`) says whether a critic taken from a reward model keeps
the reward model's head: `zero` starts it at V = 0 on the reward model's body (its features
of the prompt, without its scores); `keep` starts V(s_t) as the reward model's score of each
response prefix. A reward model is trained on whole responses only, so its reading of a
prefix is not a value: on the tiny harmlessness task (docs/benchmarks.md) the first token's
advantage then had the sign of right/wrong for 77% of responses (45% with
`method.args.score_norm=init`, whose scale the head does not share), against 94% with V = 0,
and PPO did not learn the task. A critic from the policy always gets a new zeroed head.

Memory on one GPU (the four roles; all off by default, measured in docs/benchmarks.md):

- `method.critic=shared` (peft=lora): the critic's LoRA adapter and a new zeroed value head sit on
  the policy's own base weights, the same tensors (`ppo.models.shared_base_critic`), so the base is
  held once; it starts from the policy. `separate` (default): the critic is its own model.
- `method.frozen_quant=4bit`: every reward model loads in NF4 (`reward.<name>.quant=4bit`), and so
  does the reference when the policy trains whole (under LoRA it is the policy with its adapter off).
- `method.args.offload_reward_model=true`: the reward models wait in CPU memory and visit the
  accelerator only while they score (a no-op on a CPU).

`method.args.ptx_coef` with `data.ptx_path=<demonstrations>` adds InstructGPT's pretraining
mix (PPO-ptx): every optimiser step also minimises ptx_coef x the policy's language-model loss
on a batch of the demonstrations (any SFT layout; align_cli/ppo/ptx.py). The KL penalty's pull
back to pi_ref fades as an answer's probability nears 0; the ptx loss pulls hardest there, so
the policy keeps sampling every answer its demonstrations hold until the reward has told them
apart. `align pipeline recipe=rlhf` wires the SFT stage's data in (docs/benchmarks.md, round 3:
without it PPO settled on one answer per language on half the seeds).

`method.args` fills `align_cli.ppo.config.PPOConfig` (TrainingArguments plus PPO's knobs:
batching, sampling, KL, clipping, GAE). Besides the model, the run folder holds
`samples.jsonl`: the prompt, completion and score of every eval prompt at each evaluation.

Every step also logs the collapse watch's metrics (align_cli/diagnostics.py): `kl_per_token`,
`value_explained_variance`, `distinct_1`/`distinct_2`, `identical_share`,
`top_completion_share`, and with a reward model `probe/<text>` and `probe_reward`; a
collapse signature is a warning and goes into summary.json, and `method.stop_on_collapse=true`
stops the run there, keeping the last checkpoint from before it as the run's model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ..config import one_of
from ..data.fit import PromptRoom
from ..diagnostics import PPO_KEYS, Probe
from ..errors import AlignError
from ..modeling import quiet_transformers
from ..rewards import rewards_for
from ..rewards.model import ModelReward
from .base import RolloutSettings
from .ptx_data import ptx_dataset, ptx_problems

log = logging.getLogger("align")

SUMMARY_KEYS = [
    "score",
    "kl",
    "non_score_reward",
    "policy_loss",
    "value_loss",
    "response_length",
    "eval_score",
]
# The collapse watch's metrics (align_cli/diagnostics.py), plotted in diagnostics.svg.
DIAGNOSTIC_KEYS = [
    "entropy",
    "kl_per_token",
    "policy_clipfrac",
    "value_explained_variance",
    "response_length",
    "distinct_2",
    "identical_share",
    "probe_reward",
]
CRITIC_INITS = ("auto", "reward", "policy")
CRITIC_HEADS = ("zero", "keep")
CRITICS = ("separate", "shared")
FROZEN_QUANTS = ("none", "4bit")


@dataclass
class Settings(RolloutSettings):
    """`method=ppo`: where the critic starts, plus the rollout methods' reward and collapse keys."""

    name: str = "ppo"
    dataset_type: str | None = "prompt"
    sample: str | None = "prompts.jsonl"  # instruction/input prompts, English and Chinese
    # auto | reward | policy | <reward-model entry>: where the value model starts (`critic_source`);
    # checked against the rewards in `check`
    critic_init: str = "auto"
    critic_head: str = "zero"  # zero: V = 0 at the start, on the reward model's body | keep: its head too
    # separate: the critic is its own model | shared: its LoRA adapter and value head sit on the
    # policy's own base weights (peft=lora; no second copy of the base)
    critic: str = "separate"
    # none | 4bit: the frozen roles (reward models; the reference when the policy trains whole) in NF4
    frozen_quant: str = "none"

    def __post_init__(self):
        one_of("critic_head", self.critic_head, CRITIC_HEADS, "zero (V = 0 at the start) or keep")
        one_of("critic", self.critic, CRITICS, "separate (its own model) or shared (on the policy's base)")
        one_of("frozen_quant", self.frozen_quant, FROZEN_QUANTS, "none or 4bit")
        super().__post_init__()


def config_class():
    """The config dataclass that `method.args` fills."""
    from ..ppo.config import PPOConfig

    return PPOConfig


def critic_problem(choice: str, models: list[str]) -> str | None:
    """What is wrong with `method.critic_init` given the reward-model entries' names, or None."""
    names = ", ".join(models)
    if choice == "policy":
        return None
    if choice in CRITIC_INITS:
        if not models and choice == "reward":
            return (
                "method.critic_init=reward needs a reward model among the rewards (reward=model "
                "reward.model.path=<rm run folder>); or start the critic from the policy: method.critic_init=policy"
            )
        if len(models) > 1:
            return (
                f"method.critic_init={choice}: the reward holds {len(models)} reward models ({names}); name the one "
                f"the critic starts from (e.g. method.critic_init={models[0]}) or use method.critic_init=policy"
            )
        return None
    if choice in models:
        return None
    extra = f", or a reward-model entry ({names})" if models else ""
    return f"method.critic_init={choice!r} is not valid: use auto, reward or policy{extra}"


def check(ctx, rows: list[dict] | None) -> list[str]:
    """Every check of the critic's source, the rewards and (given the training rows) the columns
    they read that needs no weights; `align data validate` runs it too."""
    from ..rewards import reward_model_names, reward_problems

    columns = sorted({k for r in rows for k in r}) if rows is not None else None
    problems = reward_problems("ppo", ctx.reward, columns) + ptx_problems(ctx) + memory_problems(ctx)
    choice, models = ctx.method["critic_init"], reward_model_names(ctx.reward)
    critic = critic_problem(choice, models)
    if critic:
        return [*problems, critic]
    if problems or choice in ("auto", "policy") or not models:
        return problems  # `auto` falls back to the policy when the tokenizers differ
    # An explicit reward-model critic must read the policy's tokens: compare the tokenizers.
    from ..config import ModelConfig
    from ..modeling import load_tokenizer
    from ..rewards import reward_model_path

    name = choice if choice in models else models[0]
    path = reward_model_path(ctx.reward, name)
    if path:
        policy = load_tokenizer(ctx.model_cfg).get_vocab()
        if load_tokenizer(ModelConfig(name_or_path=path)).get_vocab() != policy:
            problems.append(_other_tokenizer(choice, path))
    return problems


def memory_problems(ctx) -> list[str]:
    """What is wrong with the memory options (`method.critic`, `method.frozen_quant`)."""
    problems = []
    if ctx.method["critic"] == "shared":
        if ctx.peft_cfg.method == "none":
            problems.append(
                "method.critic=shared needs peft=lora: the critic shares the policy's base weights, which "
                "only stay the policy's own when they are frozen (each role trains its own adapter)"
            )
        if ctx.dist.name != "ddp":
            problems.append(
                f"method.critic=shared is not supported with dist={ctx.dist.name}: the policy and the critic share "
                "base tensors, which sharding each of them would split; use dist=ddp or method.critic=separate"
            )
        if ctx.method["critic_init"] not in ("auto", "policy"):
            problems.append(
                f"method.critic=shared reads values from the policy's base, so it cannot start from a reward "
                f"model (method.critic_init={ctx.method['critic_init']}): use method.critic_init=policy, or "
                "method.critic=separate"
            )
    if ctx.method["frozen_quant"] == "4bit":
        from ..modeling import check_bitsandbytes

        if ctx.dist.name != "ddp":
            problems.append(
                f"method.frozen_quant=4bit is not supported with dist={ctx.dist.name} (4-bit weights are not "
                "sharded, as for quant=4bit): use dist=ddp or method.frozen_quant=none"
            )

        try:
            check_bitsandbytes()
        except AlignError as err:
            problems.append(f"method.frozen_quant=4bit: {err}")
    return problems


def _other_tokenizer(choice: str, path: str) -> str:
    return (
        f"method.critic_init={choice}: the reward model '{path}' uses another tokenizer than the policy, "
        "so as a critic it could not read the policy's tokens; use method.critic_init=policy"
    )


def critic_source(choice: str, funcs: list, tokenizer) -> ModelReward | None:
    """The reward model the critic starts from, or None for the policy (see `method.critic_init`)."""
    models = {f.__name__: f for f in funcs if isinstance(f, ModelReward)}
    problem = critic_problem(choice, list(models))
    if problem:
        raise AlignError(problem)
    if choice == "policy" or (choice in CRITIC_INITS and not models):
        return None
    source = models[choice] if choice in models else next(iter(models.values()))
    if source.tokenizer.get_vocab() != tokenizer.get_vocab():
        if choice == "auto":
            log.info(
                "critic: reward model %s has another tokenizer; starting the critic from the policy",
                source.path,
            )
            return None
        raise AlignError(_other_tokenizer(choice, str(source.path)))
    return source


def zero_head(critic) -> None:
    """Sets the critic's value head to 0, so that V(s) = 0 for every state at the start."""
    import torch

    from ..ppo.models import value_head
    from ..ppo.sharding import gathered_to_modify

    head = value_head(critic)
    if type(head) is torch.nn.Linear:
        with torch.no_grad(), gathered_to_modify(head):
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


def frozen_reference(ctx):
    """The reference policy in 4 bit for `method.frozen_quant=4bit`, or None where it needs no copy.

    A policy that trains whole needs a frozen copy of its start: loaded in NF4, it takes about a
    quarter of the memory. Under LoRA the reference is the policy with its adapter off (no copy).
    """
    from ..config import QuantConfig

    if ctx.peft_cfg.method != "none":
        log.info(
            "method.frozen_quant=4bit: the reference is the policy with its LoRA adapter off (no copy to "
            "quantize%s); the reward models load in 4 bit",
            ", and in 4 bit already with quant=4bit" if ctx.quant_cfg.bits else "",
        )
        return None
    log.info("method.frozen_quant=4bit: the reference policy and the reward models load in 4 bit (NF4)")
    return ctx.load_model(quant_cfg=QuantConfig(bits=4))


def whole_reference(ctx):
    """Under dist=zero3 without LoRA, the reference policy loaded whole on every rank; else None.

    The policy loads partitioned (ZeRO-3), so the reference cannot be the usual copy of it
    taken before training. Whole, its forward is this rank's alone (frozen, it has no optimiser
    state to partition); with LoRA the reference is the policy with its adapter off.
    """
    if ctx.dist.name != "zero3" or ctx.peft_cfg.method != "none":
        return None
    from ..compat import outside_zero3

    log.info("dist=zero3: the reference policy loads whole on each rank (frozen: no optimizer state)")
    with outside_zero3():
        return ctx.load_model()


def with_model_option(reward_cfg, key: str, value):
    """A copy of the `reward` config with `key: value` set on every reward-model entry."""
    from ..rewards import reward_model_names, set_entry_option

    for name in reward_model_names(reward_cfg):
        reward_cfg = set_entry_option(reward_cfg, name, key, value)
    return reward_cfg


def prompt_room(args: dict, model_cfg) -> PromptRoom | None:
    """Prompts are sampled from with max_new_tokens of room: longer ones would have to be cut."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(config_class())}
    new = args.get("max_new_tokens", defaults["max_new_tokens"])
    max_length = args.get("max_length", model_cfg.max_length)
    key = "method.args.max_length" if "max_length" in args else "model.max_length"
    if not max_length:
        return None
    return PromptRoom(
        max_length - new, f"{key}={max_length} less method.args.max_new_tokens={new} for the sampled response"
    )


def build(ctx):
    from ..callbacks import collapse_watch
    from ..ppo.trainer import PPOTrainer

    problems = memory_problems(ctx)
    if problems:
        raise AlignError(problems[0])
    frozen_4bit = ctx.method["frozen_quant"] == "4bit"
    reward_cfg = with_model_option(ctx.reward, "quant", "4bit") if frozen_4bit else ctx.reward
    funcs, weights = rewards_for("ppo", reward_cfg, ctx.train_dataset.column_names)
    args = ctx.trl_config(config_class())
    shared = ctx.method["critic"] == "shared"
    source = None if shared else critic_source(ctx.method["critic_init"], funcs, ctx.tokenizer)
    head_choice = ctx.method["critic_head"]
    if head_choice not in CRITIC_HEADS:
        raise AlignError(
            f"method.critic_head={head_choice!r} is not valid: use zero (V = 0 at the start) or keep"
        )
    if shared:
        from ..ppo.models import shared_base_critic

        policy = ctx.load_model()
        log.info(
            "critic: a LoRA adapter and a new value head on the policy's own base weights "
            "(method.critic=shared: no second copy of the base; V = 0 at the start)"
        )
        critic = shared_base_critic(policy, ctx.tokenizer.pad_token_id)
    elif source is None:
        log.info("critic: the policy's weights with a new value head (V = 0 at the start)")
        with quiet_transformers():
            critic = ctx.load_model(kind="seq_cls")
        zero_head(critic)  # a new head: start from V = 0 rather than noise
    else:
        critic = ctx.load_model(kind="seq_cls", path=str(source.path))
        if head_choice == "zero":
            # The reward model's body (its features of the prompt), not its prefix scores (see the docstring).
            log.info("critic: the reward model's body with its head zeroed (V = 0 at the start)")
            zero_head(critic)
    if not shared:
        policy = ctx.load_model()
    ref_model = frozen_reference(ctx) if frozen_4bit else whole_reference(ctx)
    probe = Probe.for_rewards(funcs, ctx.train_dataset["prompt"])
    keys = PPO_KEYS if probe is None else dataclasses.replace(PPO_KEYS, reward=probe.reward_key)
    watch = collapse_watch(ctx.method, policy.config.vocab_size, keys)
    return PPOTrainer(
        ptx_dataset=ptx_dataset(ctx, args),
        policy=policy,
        critic=critic,
        args=args,
        processing_class=ctx.tokenizer,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        ref_model=ref_model,
        reward_funcs=funcs,
        reward_weights=weights,
        peft_config=ctx.lora("CAUSAL_LM"),
        critic_peft_config=ctx.lora("SEQ_CLS"),
        callbacks=[*ctx.callbacks, watch],
        probe=probe,
    )
