"""The getting-started example (examples/tiny_olmoe.py) runs offline and ends with an exact save / reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny_olmoe.py"


@pytest.mark.parametrize("variant", ["R", "E"])
def test_tiny_olmoe_example_trains_and_reloads(variant: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--variant", variant, "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [
        float(line.split("loss ")[1].split()[0]) for line in result.stdout.splitlines() if line.startswith("step")
    ]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert f"saved and reloaded PERFT-{variant}: logits identical = True" in result.stdout


def test_quickstart_help_answers_at_once_and_says_what_it_needs() -> None:
    quickstart = EXAMPLE.parent / "quickstart.py"
    environment = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(quickstart), "--help"], capture_output=True, text=True, timeout=60, env=environment
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Needs the Hugging Face Hub" in result.stdout and "GPU" in result.stdout
