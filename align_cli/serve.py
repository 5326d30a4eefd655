"""`align chat` and `align generate`: use a trained model (a run folder, full or LoRA) or any model.

align chat outputs/sft/<time> system="You are terse." temperature=0
align generate outputs/ppo/<time> data.path=prompts.jsonl output=out.jsonl num_return_sequences=4

Both load the model the way training does (`modeling.load_tokenizer` / `load_model`: a LoRA run
folder is merged into its base in memory, a reward model is refused with a one-line error) and
render prompts the way PPO/GRPO do (the chat template with the generation prompt).

`generate` reads any prompt layout that `align train method=ppo|grpo` reads (`prompt` as text or
messages, or the seed's `instruction`/`input`), writes one JSON line per input row (the row's
own columns plus `completion`, or `completions` with `num_return_sequences` > 1), in batches,
and resumes: rows already in `output` are checked against the input and skipped.

Here: loading, sampling settings, prompt rendering and `align chat`; `align generate` is
generate.py.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

from .config import ModelConfig
from .errors import AlignError

CHAT_USAGE = "align chat <run folder|model> [system=...] [temperature=0.7] [top_p=1.0] [max_new_tokens=256]"


MODEL_ARG = "is the first argument here: align <chat|generate> <run folder|model> ..."


@dataclass
class Sampling:
    """How answers are sampled (temperature=0: greedy decoding)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 42
    quiet: bool = False


@dataclass
class ChatOptions(Sampling):
    model: ModelConfig = field(default_factory=ModelConfig)
    system: str | None = None  # a system prompt at the start of the conversation (kept by /reset)


def check_sampling(opts: Sampling, command: str) -> None:
    """Raises a one-line AlignError for a sampling value out of range."""
    problems = []
    if opts.max_new_tokens < 1:
        problems.append(f"max_new_tokens={opts.max_new_tokens} must be at least 1")
    if opts.temperature < 0:
        problems.append(f"temperature={opts.temperature} must be 0 (greedy) or more")
    if not 0 < opts.top_p <= 1:
        problems.append(f"top_p={opts.top_p} must be in (0, 1]")
    if opts.top_k < 0:
        problems.append(f"top_k={opts.top_k} must be 0 (off) or more")
    if opts.repetition_penalty <= 0:
        problems.append(f"repetition_penalty={opts.repetition_penalty} must be positive")
    for key in ("batch_size", "num_return_sequences"):
        value = getattr(opts, key, 1)
        if value < 1:
            problems.append(f"{key}={value} must be at least 1")
    if getattr(opts, "num_return_sequences", 1) > 1 and opts.temperature == 0:
        problems.append(
            f"num_return_sequences={opts.num_return_sequences} with temperature=0 would give one greedy answer "
            "several times: sample (temperature > 0) or ask for one"
        )
    if problems:
        raise AlignError(f"{command}: {'; '.join(problems)}")


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def quiet_loading():
    """Loading a saved model for use, not training: no per-tensor loading bar, no load report, and
    no deprecation warning peft raises about transformers' own attribute names."""
    import warnings

    from transformers.utils import logging as hf_logging

    from .modeling import quiet_transformers

    hf_logging.disable_progress_bar()
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.enable_progress_bar()


def load_for_generation(model_cfg: ModelConfig):
    """The tokenizer (left padding) and the causal LM in eval mode on the best device."""
    from . import modeling

    tokenizer = modeling.load_tokenizer(model_cfg)
    tokenizer.padding_side = "left"  # generation continues each row at its right end
    with quiet_loading():
        model = modeling.load_model(model_cfg, kind="causal_lm", pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model.to(device()).eval()


def stop_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often add one)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    own = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(own if isinstance(own, list) else [own] if own is not None else [])
    return sorted(ids)


def generation_config(opts: Sampling, tokenizer, model, num_return_sequences: int = 1):
    from transformers import GenerationConfig

    sample = opts.temperature > 0
    return GenerationConfig(
        max_new_tokens=opts.max_new_tokens,
        do_sample=sample,
        temperature=opts.temperature if sample else None,
        top_p=opts.top_p if sample else None,
        top_k=opts.top_k if sample else None,
        repetition_penalty=opts.repetition_penalty,
        num_return_sequences=num_return_sequences,
        eos_token_id=stop_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
    )


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of one prompt as PPO/GRPO see it: messages through the chat template with the
    generation prompt, plain text as it is."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def context_length(model, overrides: list[str], model_cfg: ModelConfig) -> int:
    """Tokens of prompt + answer: `model.max_length` when given on the command line, else the
    model's own context (its config's max_position_embeddings); the training default of 512 would
    cut conversations and long prompts for no reason here."""
    if any(o.lstrip("+").startswith("model.max_length=") for o in overrides):
        return model_cfg.max_length
    return int(getattr(model.config, "max_position_embeddings", None) or model_cfg.max_length)


def _no_template(model_cfg: ModelConfig) -> AlignError:
    return AlignError(
        f"model '{model_cfg.name_or_path}' has no chat template: pass one with "
        "model.chat_template=<file or Jinja string>"
    )


# --- chat ---------------------------------------------------------------------------------


class Chat:
    """One conversation: the history, and an answer for each user turn."""

    def __init__(self, tokenizer, model, opts: ChatOptions, stream=None, max_length: int | None = None):
        self.tokenizer, self.model, self.opts = tokenizer, model, opts
        self.max_length = max_length or opts.model.max_length
        self.config = generation_config(opts, tokenizer, model)
        self.stream = stream  # where answers are streamed (a file); None: not streamed
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = (
            [{"role": "system", "content": self.opts.system}] if self.opts.system else []
        )

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """Drops the oldest exchanges until the prompt leaves room for an answer within
        the context length (the system prompt and the new turn always stay)."""
        limit = self.max_length - self.opts.max_new_tokens
        dropped = 0
        while True:
            ids = prompt_ids(self.tokenizer, messages)
            head = 1 if messages and messages[0]["role"] == "system" else 0
            if len(ids) <= limit or len(messages) - head <= 1:
                break
            messages = messages[:head] + messages[head + 2 :]
            dropped += 1
        if dropped:
            print(
                f"(dropped the {dropped} oldest exchange(s): the conversation is longer than "
                f"{self.max_length} tokens less max_new_tokens={self.opts.max_new_tokens}; see model.max_length)",
                file=sys.stderr,
                flush=True,
            )
        return messages, ids

    def answer(self, text: str) -> str:
        """Answers one user turn (streamed to `stream` as it is generated) and adds both to the history."""
        import torch
        from transformers import TextStreamer

        messages, ids = self._fit([*self.history, {"role": "user", "content": text}])
        self.history = messages
        streamer = None
        if self.stream is not None:
            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            # TextStreamer prints to stdout; send it where this chat streams.
            streamer.on_finalized_text = lambda piece, stream_end=False: self._write(piece, stream_end)
        inputs = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                generation_config=self.config,
                streamer=streamer,
            )
        reply = self.tokenizer.decode(out[0, inputs.shape[1] :], skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def _write(self, piece: str, stream_end: bool) -> None:
        self.stream.write(piece + ("\n" if stream_end else ""))
        self.stream.flush()


def chat_main(argv: list[str]) -> None:
    """Entry for `align chat <model> [key=value ...]`."""
    from . import options

    (path,), overrides = options.split_args(argv, 1, CHAT_USAGE)
    opts = options.parse(ChatOptions, overrides, "align chat", {"model.name_or_path": MODEL_ARG})
    opts.quiet = opts.quiet or options.quiet_flag(argv)
    opts.model.name_or_path = path
    check_sampling(opts, "align chat")
    tty = sys.stdin.isatty()
    if tty and not opts.quiet:
        print(f"align chat: loading {path} ...", file=sys.stderr, flush=True)
    tokenizer, model = load_for_generation(opts.model)
    if tokenizer.chat_template is None:
        raise _no_template(opts.model)
    from transformers import set_seed

    set_seed(opts.seed)
    chat = Chat(
        tokenizer, model, opts, stream=sys.stdout, max_length=context_length(model, overrides, opts.model)
    )
    if tty and not opts.quiet:
        print("type a message; /reset clears the history, /exit quits", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            chat.reset()
            if not opts.quiet:
                print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:  # a mistyped command is not a message
            print(
                f"(unknown command {text}: /reset clears the history, /exit quits)",
                file=sys.stderr,
                flush=True,
            )
            continue
        chat.answer(text)


# --- generate -----------------------------------------------------------------------------
