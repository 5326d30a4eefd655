"""Which network plays which PPO role, and how each is read.

Four roles (seed 2.3): the policy (a causal LM, trained), the critic (a one-output
sequence-classification model read at every response position, trained), the reference
(frozen: a copy of the starting policy, or with LoRA the policy itself with its adapter switched
off, so no second copy) and the reward models (frozen, read once per response).
`prepare_roles` sets them up; the functions below read logits, values and scores from them.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from .config import PPOConfig


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its LoRA layers stay injected), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def value_head(model: nn.Module) -> nn.Module:
    """The one-output head of a sequence-classification model (`score` for most decoders)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no score/classifier head to read values or rewards from")


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def disable_dropout(model: nn.Module) -> None:
    """Dropout would make pi_old (rollout) and pi_theta (update) differ for no reason; turn it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def forward_inputs(sequences: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs whose last R positions predict the R response tokens.

    The last token is dropped (nothing is predicted from it); position ids count real tokens
    only, as `generate` does for left-padded prompts. (B, T) -> (B, T - 1) tensors.
    """
    mask = attention_mask[:, :-1]
    return {
        "input_ids": sequences[:, :-1],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def critic_values(critic: nn.Module, inputs: dict[str, torch.Tensor], response_length: int) -> torch.Tensor:
    """V(s_t) for the R response positions: the head applied to each position's last hidden state. -> (B, R)."""
    model = unwrap_peft(critic)
    hidden = backbone(model)(**inputs, use_cache=False).last_hidden_state[:, -response_length:]  # (B, R, H)
    return value_head(model)(hidden).squeeze(-1).float()


@torch.no_grad()
def reward_model_scores(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """A reward model's score of each (prompt + response) token row. -> (B,).

    Read where the model's own forward reads it, so the score is the one it was trained to give:
    at the last token that is not its pad token. That is the last real token (`last_index`),
    or the one before it when the pad token is the EOS that ends the response.
    """
    model = unwrap_peft(model)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        real = attention_mask.bool() & (sequences != pad)
        positions = torch.arange(sequences.shape[1], device=sequences.device)
        last_index = torch.minimum((positions * real).argmax(-1), last_index)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(model)(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # (B, H)
    return value_head(model)(picked).squeeze(-1).float()


@contextmanager
def sampling_only(model: nn.Module, config: GenerationConfig):
    """Makes `config` the whole generation config of `model` (and of the model inside a PeftModel).

    `generate` fills every field left unset with the model's own `generation_config`: a
    checkpoint's repetition penalty, `min_new_tokens` or suppressed tokens would then reshape
    the sampling distribution, and the log-probs PPO scores (softmax(logits / T)) would no longer
    be the behaviour policy's. With a bare config, only what `config` sets applies.
    """
    holders = [
        m for m in {id(m): m for m in (model, unwrap_peft(model))}.values() if hasattr(m, "generation_config")
    ]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = copy.deepcopy(config)
    try:
        yield
    finally:
        for m, old in zip(holders, saved, strict=True):
            m.generation_config = old


class PolicyAndCritic(nn.Module):
    """The two trained networks as one module: one optimiser, one `accelerator.prepare`, one DDP wrapper
    (under dist=fsdp, no wrapper: each network's parts are FSDP2 roots of their own, sharding.py)."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_length: int,
        values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy logits (B, R, V) and critic values (B, R) at the response positions (None
        with `values=False`: the policy alone, e.g. the ptx loss through a DeepSpeed engine)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        # logits_to_keep: the LM head (often the largest matmul) runs on response positions only.
        logits = self.policy(**inputs, logits_to_keep=response_length, use_cache=False).logits
        return logits, critic_values(self.critic, inputs, response_length) if values else None


# What transformers and peft read off a quantized model (QLoRA); a shared-base critic carries them too.
QUANT_ATTRS = ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method", "hf_quantizer")


def shared_base_critic(policy: nn.Module, pad_token_id: int | None = None) -> nn.Module:
    """A critic whose body is the policy's own base weights, with a new zeroed value head.

    For `method.critic=shared` under LoRA (the base stays frozen, so no role changes it): the
    critic is a sequence-classification model of the policy's config whose backbone modules
    are copies of the policy's, each holding the very same parameter and buffer tensors (no
    second copy of the base in memory). LoRA then wraps the two sets of modules separately, so
    the critic's adapter and head train on their own and the policy's forward never sees them.

    Args:
        policy: the causal LM, before its LoRA adapter is added.
        pad_token_id: written into the critic's config.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    # The shell only: its body is replaced below, so nothing is allocated for it.
    with torch.device("meta"):
        critic = AutoModelForSequenceClassification.from_config(config)
    body = backbone(policy)
    shared = {id(t): t for t in [*body.parameters(), *body.buffers()]}
    setattr(critic, critic.base_model_prefix, copy.deepcopy(body, shared))  # new modules, same tensors
    old_head = value_head(critic)
    weight = next(p for p in body.parameters() if p.is_floating_point())  # not a packed 4-bit one
    head = nn.Linear(old_head.in_features, 1, bias=old_head.bias is not None)
    head.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.zero_()  # V = 0 at the start
        if head.bias is not None:
            head.bias.zero_()
    name = next(n for n, m in critic.named_children() if m is old_head)
    setattr(critic, name, head)
    left = [n for n, t in [*critic.named_parameters(), *critic.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(critic).__name__}: {left[0]} is not part of the policy's base to share")
    for attr in QUANT_ATTRS:
        if hasattr(policy, attr):
            setattr(critic, attr, getattr(policy, attr))
    return critic


def shared_storage(*modules: nn.Module) -> tuple[int, int]:
    """(bytes of all the modules' parameters counted per module, bytes of the distinct tensors among them).

    The two differ by what the modules share: for a shared-base critic beside its policy, the base.
    """
    total, seen = 0, {}
    for module in modules:
        for param in module.parameters():
            size = param.numel() * param.element_size()
            total += size
            seen[param.data_ptr()] = max(seen.get(param.data_ptr(), 0), size)
    return total, sum(seen.values())


def with_lora(model: nn.Module, peft_config: Any, args: PPOConfig) -> nn.Module:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(args.activation_checkpointing)
        )
    return get_peft_model(model, peft_config)


def is_quantized(model: nn.Module | None) -> bool:
    return model is not None and getattr(model, "quantization_method", None) is not None


def sampling_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the sampling distribution (temperature applied), float32."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def prepare_roles(
    policy: nn.Module,
    critic: nn.Module,
    ref_model: nn.Module | None,
    args: PPOConfig,
    peft_config: Any = None,
    critic_peft_config: Any = None,
) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """The (policy, critic, reference) to train with: LoRA applied, dropout off, the reference frozen.

    Returns a reference of None when the policy carries a LoRA adapter: the reference is then the
    policy with the adapter off (`reference_context`).
    """
    if ref_model is None and peft_config is None and not hasattr(policy, "peft_config"):
        ref_model = copy.deepcopy(policy)  # before any training touches the weights
    if peft_config is not None:
        policy = with_lora(policy, peft_config, args)
    if critic_peft_config is not None:
        critic = with_lora(critic, critic_peft_config, args)
    for module in (policy, critic, ref_model):
        if module is not None:
            disable_dropout(module)
    if ref_model is not None:
        ref_model.requires_grad_(False).eval()
    # dist=fsdp moves the setting into FSDP's config (dist.training_args); our loop shards the
    # roles itself (sharding.py), so it is applied here either way.
    fsdp_checkpointing = (getattr(args, "fsdp_plugin_args", None) or {}).get("activation_checkpointing")
    if args.activation_checkpointing or fsdp_checkpointing:
        for module in (policy, critic):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, critic, ref_model


def reference_context(policy: nn.Module, ref_model: nn.Module | None):
    """Where the reference runs: the policy with its adapter off when there is no separate reference."""
    return policy.disable_adapter() if ref_model is None else nullcontext()


def reference(policy: nn.Module, ref_model: nn.Module | None) -> nn.Module:
    """The module to call (inside `reference_context`) for log pi_ref."""
    return ref_model if ref_model is not None else policy
