"""align: align language models with human preferences from one Hydra-configured command."""

__version__ = "0.1.0"
