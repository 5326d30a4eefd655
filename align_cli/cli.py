"""The `align` command: subcommand dispatch only (Hydra owns the options of each subcommand).

Nothing heavy is imported here, so `align --help` is instant.
"""

from __future__ import annotations

import sys

from . import __version__

USAGE = """usage: align <command> [overrides ...]

Align language models with human preferences: SFT, reward models (pointwise, pairwise,
listwise), PPO, DPO, KTO and GRPO, configured with Hydra.

commands:
  train            train with one method:  align train method=dpo [group=option] [key=value]
                   sweep with Hydra:       align train -m method=dpo method.args.beta=0.1,0.5
                   options and groups:     align train --help
  data validate    check a dataset for a method without training:
                                           align data validate method=kto data.path=my.jsonl
  chat             talk to a model:        align chat <run folder|model> [system=...] [temperature=0]
  generate         answer a prompts file:  align generate <run|model> data.path=p.jsonl output=out.jsonl
  export           one plain model folder: align export <run folder> <out dir> [dtype=bfloat16]
  version          print the version

examples:
  align train method=dpo                       # tiny offline model + data_samples/, on a CPU
  align train method=rm method.mode=listwise peft=lora
  align train method=dpo --cfg job             # print the composed config
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(argv)
    except KeyboardInterrupt:
        # Ctrl-C outside training (composing, reading data, loading a model): nothing to save.
        if any(a.lstrip("+").lower() in ("debug=true", "debug=1") for a in argv):
            raise
        print("\nalign: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        train_main(rest)
    elif command == "data":
        if not rest or rest[0] in ("-h", "--help") or {"-h", "--help"} & set(rest[1:]):
            print(DATA_USAGE)
            return
        if rest[0] != "validate":
            _fail(f"unknown data command '{rest[0]}': use `align data validate`")
        from .validate import main as validate_main

        validate_main(rest[1:])
    elif command in ("chat", "generate", "export"):
        _serve(command, rest)
    elif command in ("version", "--version"):
        print(f"align {__version__}")
    else:
        _fail(f"unknown command '{command}': use train, data validate or version (see align --help)")


DATA_USAGE = """usage: align data validate method=<name> [data=<name>] [data.path=<file>] [key=value ...]

Reads the whole dataset the way `align train` would and reports every problem with its file
and line (missing or mistyped columns, empty texts, identical chosen and rejected, malformed
JSON, prompts longer than model.max_length), then a summary: rows, columns, detected input
format, token-length percentiles. Exits 0 when the data is ready to train on, 1 otherwise.

examples:
  align data validate method=kto data.path=my_feedback.jsonl
  align data validate method=dpo data=ultrafeedback model=qwen2.5-0.5b
"""


def _serve(command: str, rest: list[str]) -> None:
    """`align chat|generate|export`: key=value options (no Hydra run folder), one-line errors."""
    if {"-h", "--help"} & set(rest):
        from . import export, serve

        print(
            f"usage: {dict(chat=serve.CHAT_USAGE, generate=serve.GENERATE_USAGE, export=export.USAGE)[command]}"
        )
        return
    from .errors import AlignError

    debug = any(a.lower() in ("debug=true", "debug=1") for a in rest)
    rest = [a for a in rest if not a.lower().startswith("debug=")]
    try:
        if command == "export":
            from .export import main as entry
        else:
            from . import serve

            entry = serve.chat_main if command == "chat" else serve.generate_main
        entry(rest)
    except AlignError as err:
        if debug:
            raise
        print(f"align: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


def _fail(message: str) -> None:
    print(f"align: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
