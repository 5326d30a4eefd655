"""Hydra's command-line parser and the texts of its messages (see `align_cli.compat`)."""

from __future__ import annotations

# --- Hydra ------------------------------------------------------------------------------------

# The flags of Hydra's parser that align reads (`preflight.prepare`, `pipeline.prepare`).
HYDRA_FLAGS = (
    "help",
    "hydra_help",
    "shell_completion",
    "info",
    "experimental_rerun",
    "multirun",
    "cfg",
    "config_name",
    "config_path",
    "config_dir",
    "overrides",
)


def hydra_args_parser():
    """Hydra's own command-line parser (an `argparse.ArgumentParser`; its flags: `HYDRA_FLAGS`).

    hydra-core 1.3.8: `hydra._internal.utils.get_args_parser`. align picks the run folder and
    checks every override before `hydra.main` starts, so it must split the command line exactly
    as Hydra will; Hydra exposes no public parser.
    """
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


# hydra-core 1.3.8 / omegaconf 2.3: the beginnings of the messages align turns into one-line
# errors (`errors.hydra_message`). These errors have no type or attribute of their own that
# says which they are (each is a ConfigCompositionException), so only the text tells.
HYDRA_AMBIGUOUS = "Ambiguous value for argument"  # key=a,b without -m
HYDRA_NO_CHOICE = "You must specify '{group}'"  # a defaults-list group left as ???, then its options
HYDRA_MERGE = "Error merging override"  # a value of the wrong type; the cause says why
OMEGACONF_NOT_IN = " not in "  # "Key 'x' not in 'ModelConfig'": a key the schema does not have
HYDRA_TOKEN_ERROR = "token recognition error"  # the override lexer (ANTLR) met a character it has no rule for


def is_ambiguous_value(message: str) -> bool:
    """Whether Hydra refused `key=a,b` (a sweep's syntax) in a single run."""
    return message.startswith(HYDRA_AMBIGUOUS)


def missing_choice(message: str, group: str) -> list[str] | None:
    """The options Hydra lists when no option of `group` was chosen; None for another message.

    hydra-core 1.3.8 writes "You must specify 'method', e.g, method=<OPTION>", then
    "Available options:", then one option per line.
    """
    if not message.startswith(HYDRA_NO_CHOICE.format(group=group)):
        return None
    return [line.strip() for line in message.splitlines()[2:] if line.strip()]


def is_unquoted_character_error(reason: str) -> bool:
    """Whether Hydra's override parser stopped at a character its unquoted values cannot hold
    (any non-ASCII letter, as in `data.system=你是助手`); quoting the value is then the fix."""
    return HYDRA_TOKEN_ERROR in reason


def is_merge_error(reason: str) -> bool:
    """Whether Hydra's message is its bare "Error merging override <o>" (the cause holds why)."""
    return reason.startswith(HYDRA_MERGE)


def is_unknown_key(cause: BaseException | None) -> bool:
    """Whether OmegaConf refused a key its (structured) config does not have."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    return isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and OMEGACONF_NOT_IN in str(cause)
