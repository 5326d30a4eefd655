"""align: align language models with human preferences from one Hydra-configured command."""

from .compat import quiet_library_noise

__version__ = "0.1.0"

quiet_library_noise()  # before anything (peft) imports bitsandbytes
