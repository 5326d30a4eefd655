"""align: align language models with human preferences from one Hydra-configured command."""

from .compat import quiet_bitsandbytes_import

__version__ = "0.1.0"

quiet_bitsandbytes_import()  # before anything (peft) imports bitsandbytes
