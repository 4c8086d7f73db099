"""The ``peft-perft`` console command: one subcommand per user-facing tool.

Each subcommand lives in its own module, which exposes ``add_cli_arguments(parser)`` and ``run_cli(args) -> int``.
Modules are imported only when their subcommand runs. This dispatcher is a top-level module, not part of the
``peft_perft`` package, because importing anything inside that package imports peft (and with it torch, transformers
and bitsandbytes: seconds); so ``peft-perft --help`` and ``peft-perft --version`` answer without importing torch, and
the version is read from the installed distribution's metadata. A mistake in the inputs
(``peft_perft.cli.inputs.InputError``, or any other ``ValueError`` / ``OSError`` a subcommand raises) is printed as one
line with exit status 2; set ``PEFT_PERFT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peft_perft.demo", "fine-tune the bundled pretrained MoE with PERFT end to end"),
    "eval": ("peft_perft.evaluation", "evaluate a model or adapter with the paper's protocol"),
    "pilot": ("peft_perft.pilot", "compare PERFT variants and LoRA on a slice of your data"),
}
DEBUG_ENV = "PEFT_PERFT_DEBUG"
USAGE_ERROR_STATUS = 2
DISTRIBUTION = "peft-perft"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to every flag's help unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return f"{text} (default: {default})"


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a flag mistake in one line, as every other input mistake is, with the closest flag for a misspelling
    (``--varient`` -> ``--variant``), instead of argparse's usage block followed by the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            USAGE_ERROR_STATUS,
            f"{self.prog}: error: {message}{_closest_flag(self, message)}; '{self.prog} --help' lists the flags\n",
        )


def _closest_flag(parser: argparse.ArgumentParser, message: str) -> str:
    """ " (did you mean --x?)" for the first unrecognized flag that is close to one the command knows."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    known = _option_strings(parser)
    for word in message.split(":", 1)[1].split():
        flag = word.split("=", 1)[0]
        matches = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
        if matches:
            return f" (did you mean {matches[0]}?)"
    return ""


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of the parser and of its subcommands' parsers."""
    flags = []
    for action in parser._actions:
        flags += [flag for flag in action.option_strings if flag.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                flags += _option_strings(subparser)
    return flags


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the selected subcommand's module is imported."""
    parser = OneLineErrorParser(prog="peft-perft", description="PERFT for Mixture-of-Experts LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == selected:
            importlib.import_module(module_name).add_cli_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peft-perft`` command."""
    argv = sys.argv[1:] if argv is None else argv
    selected = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    args = build_parser(selected).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run_cli(args) or 0)
    except (ValueError, OSError) as error:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        from peft_perft.cli.inputs import InputError  # the subcommand imported peft_perft already: costs nothing

        hint = "" if isinstance(error, InputError) else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"peft-perft {args.command}: error: {error}{hint}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except KeyboardInterrupt:
        print(f"peft-perft {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    """The installed distribution's version, read without importing peft_perft (which imports torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed: running from a source tree)"


if __name__ == "__main__":
    raise SystemExit(main())
