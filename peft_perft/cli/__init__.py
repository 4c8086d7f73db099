"""The `peft-perft` command: the input checks its subcommands share (`inputs`) and the dispatcher's public names.

The dispatcher itself is the top-level module ``peft_perft_cli`` (the console script's entry point), outside this
package: importing the package imports peft and torch, and ``peft-perft --help`` / ``--version`` must not. Its names
are re-exported here, so ``from peft_perft.cli import main`` and ``python -m peft_perft.cli`` work as before.
"""

from __future__ import annotations

from peft_perft_cli import DEBUG_ENV, SUBCOMMANDS, USAGE_ERROR_STATUS, HelpFormatter, build_parser, main

from .inputs import InputError

__all__ = ["DEBUG_ENV", "SUBCOMMANDS", "USAGE_ERROR_STATUS", "HelpFormatter", "InputError", "build_parser", "main"]
