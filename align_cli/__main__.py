"""`python -m align_cli ...` is `align ...` (no console script needed)."""

from .cli import main

main()
