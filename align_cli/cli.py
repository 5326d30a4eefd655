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
  version          print the version

examples:
  align train method=dpo                       # tiny offline model + data_samples/, on a CPU
  align train method=rm method.mode=listwise peft=lora
  align train method=dpo --cfg job             # print the composed config
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        train_main(rest)
    elif command == "data":
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: align data validate method=<name> [data=<name>] [data.path=<file>] [key=value ...]")
            return
        if rest[0] != "validate":
            _fail(f"unknown data command '{rest[0]}': use `align data validate`")
        from .validate import main as validate_main

        validate_main(rest[1:])
    elif command in ("version", "--version"):
        print(f"align {__version__}")
    else:
        _fail(f"unknown command '{command}': use train, data validate or version (see align --help)")


def _fail(message: str) -> None:
    print(f"align: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
