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
  pipeline         stages as one job:      align pipeline recipe=<rlhf|rlhf_grpo|dpo|kto> [<stage>.<key>=v]
  data validate    check a dataset for a method without training:
                                           align data validate method=kto data.path=my.jsonl
  data preview     the rows the trainer gets, as JSON lines (rows=N, rendered=true):
                                           align data preview method=dpo data.path=my.jsonl
  sweep report     rebuild a sweep's results table:  align sweep report multirun/dpo/<time>
  eval             evaluate policies (reward, win rate, KL, diversity) or reward models:
                                           align eval model.name_or_path=<run>,<run> reward=model ...
                                           align eval method=rm model.name_or_path=<rm run> data.path=pairs.jsonl
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
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # One run (a sweep's launcher may run its jobs in other processes, and this one waits on them).
    if argv[:1] == ["pipeline"] or (argv[:1] == ["train"] and not {"-m", "--multirun"} & set(argv)):
        from . import collector

        collector.defer()  # until the run's checks have imported the libraries (align_cli/collector.py)
    if not as_program:
        _run(argv)
        return
    # The `align` program: as a rank of a torchrun launch it ends without the interpreter's
    # teardown, which can abort a finished rank (align_cli/dist.py, end_rank).
    try:
        _run(argv)
    except SystemExit as done:
        _end_rank(done.code)
        raise
    except BaseException:
        if _a_rank():
            import traceback

            traceback.print_exc()
            _end_rank(1)
        raise
    _end_rank(0)


def _a_rank() -> bool:
    if "torch.distributed" not in sys.modules:  # nothing distributed ran in this process
        return False
    from .dist import rank_with_group

    return rank_with_group()


def _end_rank(code: int | str | None) -> None:
    """Returns at once unless this process is a rank with a process group (then it exits)."""
    if "torch.distributed" in sys.modules:  # end_rank checks the rest
        from .dist import end_rank

        end_rank(code)


def _run(argv: list[str]) -> None:
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
        from .launch import main as train_main

        train_main(rest)
    elif command == "pipeline":
        from .pipeline import main as pipeline_main

        pipeline_main(rest)
    elif command == "data":
        if not rest or rest[0] in ("-h", "--help") or {"-h", "--help"} & set(rest[1:]):
            print(DATA_USAGE)
            return
        if rest[0] == "preview":
            from .data.preview import main as preview_main

            preview_main(rest[1:])
            return
        if rest[0] != "validate":
            _fail(f"unknown data command '{rest[0]}': use `align data validate` or `align data preview`")
        from .validate import main as validate_main

        validate_main(rest[1:])
    elif command == "eval":
        from .evaluate import main as eval_main

        eval_main(rest)
    elif command == "sweep":
        from .sweep import main as sweep_main

        sweep_main(rest)
    elif command in ("chat", "generate", "export"):
        _serve(command, rest)
    elif command in ("version", "--version"):
        print(f"align {__version__}")
    else:
        _fail(
            f"unknown command '{command}': use train, pipeline, eval, chat, generate, export, data validate|preview, sweep report "
            "or version (see align --help)"
        )


DATA_USAGE = """usage: align data validate method=<name> [data=<name>] [data.path=<file>] [key=value ...]
       align data preview method=<name> [data.path=<file>] [rows=N] [rendered=true] [key=value ...]

Reads the whole dataset the way `align train` would and reports every problem with its file
and line (missing or mistyped columns, empty texts, identical chosen and rejected, malformed
JSON, prompts longer than model.max_length), then a summary: rows, columns, detected input
format, token-length percentiles. Exits 0 when the data is ready to train on, 1 otherwise.

`preview` prints the first N (default 3) training rows exactly as the trainer gets them, one
JSON object per line with its `source` (file:line), and nothing else on stdout; rendered=true
adds the chat-template text and the part the loss is computed on.

examples:
  align data validate method=kto data.path=my_feedback.jsonl
  align data validate method=dpo data=ultrafeedback model=qwen2.5-0.5b
  align data preview method=sft data.path=chats.jsonl rows=5 rendered=true | jq .
"""


def _serve(command: str, rest: list[str]) -> None:
    """`align chat|generate|export`: key=value options (no Hydra run folder), one-line errors."""
    if {"-h", "--help"} & set(rest):
        from . import export, generate, serve

        print(
            f"usage: {dict(chat=serve.CHAT_USAGE, generate=generate.GENERATE_USAGE, export=export.USAGE)[command]}"
        )
        return
    from .errors import AlignError

    debug = any(a.lower() in ("debug=true", "debug=1") for a in rest)
    rest = [a for a in rest if not a.lower().startswith("debug=")]
    try:
        if command == "export":
            from .export import main as entry
        else:
            from . import generate, serve

            entry = serve.chat_main if command == "chat" else generate.generate_main
        entry(rest)
    except AlignError as err:
        if debug:
            raise
        print(f"align: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


def _fail(message: str) -> None:
    from .errors import EXIT_USAGE

    print(f"align: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
