"""The bundled demo model rebuilds bit for bit: `scripts/train_demo_model.py --check-reproduction` in a subprocess.

The script reruns the first steps of the command recorded in the model's ``training_metadata.json`` and compares a
SHA-256 of the weights with the one recorded when the bundled weights were made. The claim holds for the recorded
torch and Transformers versions; under others the test says so and skips.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPT = REPOSITORY / "scripts" / "train_demo_model.py"
BUNDLED = REPOSITORY / "peft_perft" / "demo" / "assets" / "demo-olmoe"
METADATA = json.loads((BUNDLED / "training_metadata.json").read_text())


def _require_recorded_versions() -> None:
    recorded = METADATA["versions"]
    here = {"torch": torch.__version__, "transformers": transformers.__version__}
    if any(recorded[name] != version for name, version in here.items()):
        pytest.skip(
            f"bit-for-bit reproduction is claimed for torch {recorded['torch']} and transformers "
            f"{recorded['transformers']}; this environment has torch {here['torch']} and transformers "
            f"{here['transformers']}"
        )


def test_recorded_final_fingerprint_is_that_of_the_bundled_weights() -> None:
    """The recorded SHA-256 describes the shipped file, so a rebuild that matches it matches the bundled model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(BUNDLED / "model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == METADATA["weights_sha256_after_steps"]["final"]


def test_first_training_steps_rebuild_the_recorded_weights_bit_for_bit() -> None:
    _require_recorded_versions()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-reproduction"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "reproduced: after 20 steps the weights equal the recorded ones bit for bit" in result.stdout
