"""The README and the documentation pages cannot drift from the code: their imports and commands work.

Every ``import`` of ``peft_perft`` in a Python block is executed; every ``peft-perft`` command line in a shell or
transcript block is parsed by the real CLI parser, so a flag that does not exist fails here instead of in a user's
terminal. ``tests/test_docs_snippets.py`` runs the Python blocks themselves.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from peft_perft.cli import SUBCOMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(?P<language>\w*)\n(?P<body>.*?)^```", re.M | re.S)
INLINE_COMMAND = re.compile(r"`(peft-perft [^`]+)`")
PERFT_IMPORT = re.compile(r"^(?:from peft_perft[\w.]* import .+|import peft_perft[\w.]*)$")


def blocks(path: Path, *languages: str) -> list[str]:
    """The bodies of the fenced code blocks of one Markdown file in the given languages."""
    return [match["body"] for match in FENCE.finditer(path.read_text()) if match["language"] in languages]


def documented_imports() -> list[tuple[str, str]]:
    """(file, import statement) for every peft_perft import in a Python block of the README or the docs."""
    found = []
    for path in [README, *PAGES]:
        for body in blocks(path, "python"):
            statements = body.replace("(\n", "(").replace(",\n", ", ").split("\n")
            found += [(path.name, line.split("#")[0].strip()) for line in statements if PERFT_IMPORT.match(line)]
    return found


def documented_commands() -> list[tuple[str, tuple[str, ...], bool]]:
    """(file, argv, whether it is a whole command) for every ``peft-perft`` command in the README and the docs.

    Commands in shell blocks and ``$``-prompted lines of transcripts (continuation lines joined) are whole; in inline
    code a bare ``peft-perft eval`` may just name the command, so only inline commands with flags count as whole.
    """
    found = []
    for path in [README, *PAGES]:
        shell = [line for body in blocks(path, "bash", "sh") for line in body.replace("\\\n", " ").split("\n")]
        transcripts = [line for body in blocks(path, "text", "") for line in body.replace("\\\n", " ").split("\n")]
        candidates = [(line, True) for line in shell]
        candidates += [(line.removeprefix("$ "), True) for line in transcripts if line.startswith("$ ")]
        candidates += [(span, False) for span in INLINE_COMMAND.findall(path.read_text())]
        for line, in_block in candidates:
            command = line.split("#")[0].strip()
            if command.startswith("peft-perft "):
                argv = tuple(shlex.split(command)[1:])
                found.append((path.name, argv, in_block or len(argv) > 1))
    return list(dict.fromkeys(found))


def test_the_docs_document_imports_and_commands() -> None:
    """The collectors below see the README's quickstart and the CLI transcripts (guards against a silent no-op)."""
    assert any(name == "README.md" for name, _ in documented_imports())
    assert {argv[0] for _, argv, _ in documented_commands()} >= {"demo", "eval", "pilot"}


@pytest.mark.parametrize(("page", "statement"), documented_imports())
def test_documented_import_works(page: str, statement: str) -> None:
    exec(statement, {})


@pytest.mark.parametrize(("page", "argv", "whole"), documented_commands(), ids=lambda value: str(value)[:60])
def test_documented_command_parses(page: str, argv: tuple[str, ...], whole: bool) -> None:
    if argv[0].startswith("-"):  # a flag of peft-perft itself, e.g. --version: answers and exits 0
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(list(argv))
        assert exit_info.value.code == 0, f"{page}: `peft-perft {' '.join(argv)}` failed"
        return
    assert argv[0] in SUBCOMMANDS, f"{page}: `peft-perft {argv[0]}` is not a command"
    if whole:
        build_parser(argv[0]).parse_args(list(argv))


def test_the_site_loads_nothing_from_other_hosts(tmp_path: Path) -> None:
    """Code is highlighted when the site is built (Pygments), so the pages read offline: no script or stylesheet
    from a CDN (the theme's highlight.js is switched off)."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs extra")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    build(load_config(str(REPO / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True))
    pages = list((tmp_path / "site").rglob("*.html"))
    external = re.compile(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"')
    assert not [(page.name, found) for page in pages for found in external.findall(page.read_text())]
    training = (tmp_path / "site" / "training" / "index.html").read_text()
    assert '<span class="kn">import</span>' in training  # highlighted at build time
    assert (tmp_path / "site" / "css" / "pygments.css").is_file()
