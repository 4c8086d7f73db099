"""Every Python snippet of the README and the documentation runs as written, on CPU, or says why it cannot.

A snippet that cannot run here (it needs a GPU, downloads from the Hub, or needs several processes) is marked in the
Markdown with an HTML comment right before its fence, ``<!-- not run: <reason> -->``, which readers of the page
source see too. Every other snippet runs: a page's snippets run in order in one fresh Python process, in an empty
folder, so a later snippet may use what an earlier one on the same page defined or saved (as a reader following the
page would). The Hub is switched off in that process, so a snippet that quietly downloads fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(?P<language>\w*)\n(?P<body>.*?)^```", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>(?:(?!-->).)*?) -->\s*\Z", re.S)
ANY_NOT_RUN_MARK = re.compile(r"<!-- not run:")
SECONDS_PER_PAGE = 300

# Runs each snippet in the page's namespace and names the snippet (page:line) in the traceback of a failure.
DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
for label, code in json.load(open(sys.argv[1])):
    exec(compile(code, label, "exec"), namespace)
"""


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    not_run_reason: str | None

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """The page's Python blocks, each with the reason it is not run if a marker comment stands right before it."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match["language"] != "python":
            continue
        marker = NOT_RUN.search(text[: match.start()])
        found.append(
            Snippet(
                page=page,
                line=text.count("\n", 0, match.start()) + 2,
                code=match["body"],
                not_run_reason=marker["reason"].strip() if marker else None,
            )
        )
    return found


ALL_SNIPPETS = [snippet for page in PAGES for snippet in snippets(page)]
PAGES_TO_RUN = [page for page in PAGES if any(s.not_run_reason is None for s in snippets(page))]


def test_every_snippet_is_run_or_says_why_not() -> None:
    """Each marker sits right before a Python block and gives a reason; no marker is left dangling."""
    markers = sum(len(ANY_NOT_RUN_MARK.findall(page.read_text())) for page in PAGES)
    marked = [snippet for snippet in ALL_SNIPPETS if snippet.not_run_reason is not None]
    assert markers == len(marked), "a `<!-- not run: ... -->` marker does not stand right before a ```python block"
    for snippet in marked:
        assert len(snippet.not_run_reason.split()) >= 3, f"{snippet.label}: say why the snippet is not run"
    run = [snippet for snippet in ALL_SNIPPETS if snippet.not_run_reason is None]
    assert len(run) + len(marked) == len(ALL_SNIPPETS)
    assert any(snippet.page.name == "README.md" for snippet in run), "the README's quickstart must run"


@pytest.mark.parametrize("page", PAGES_TO_RUN, ids=lambda page: str(page.relative_to(REPO)))
def test_page_snippets_run_as_written(page: Path, tmp_path: Path) -> None:
    runnable = [(s.label, s.code) for s in snippets(page) if s.not_run_reason is None]
    blocks = tmp_path / "snippets.json"
    blocks.write_text(json.dumps(runnable))
    workdir = tmp_path / "reader"
    workdir.mkdir()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(blocks)],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_PAGE,
    )
    assert result.returncode == 0, f"{page.name}: a snippet failed\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_monitoring_example_prompt_is_in_the_bundled_vocabulary() -> None:
    """The traced prompt of the monitoring page maps to real tokens of the bundled model, none to ``<unk>``."""
    from transformers import AutoTokenizer

    from peft_perft.demo import BUNDLED_MODEL_DIR

    prompts = re.findall(r'routing_trace\(trainer\.model, "([^"]+)"', (REPO / "docs" / "monitoring.md").read_text())
    assert prompts, "the monitoring page no longer traces a prompt string"
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, f"{prompt!r} has characters the bundled tokenizer lacks"
        assert tokenizer.decode(ids) == prompt
