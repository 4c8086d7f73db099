"""The `peft-perft` console command: one subcommand per user-facing tool.

Each subcommand lives in its own module, which exposes ``add_cli_arguments(parser)`` and
``run_cli(args) -> int``. Modules are imported only when their subcommand runs, so
``peft-perft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peft_perft.demo", "fine-tune the bundled pretrained MoE with PERFT end to end"),
    "eval": ("peft_perft.evaluation", "evaluate a model or adapter with the paper's protocol"),
    "pilot": ("peft_perft.pilot", "compare PERFT variants and LoRA on a slice of your data"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the selected subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="peft-perft", description="PERFT for Mixture-of-Experts LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).add_cli_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peft-perft`` command."""
    argv = sys.argv[1:] if argv is None else argv
    selected = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    args = build_parser(selected).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run_cli(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
