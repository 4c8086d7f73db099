"""The bundled demo model's recipe rebuilds: `scripts/train_demo_model.py --check-reproduction` in a subprocess.

The script reruns the first steps of the command recorded in the model's ``training_metadata.json`` and compares the
weights with the record: bit for bit by SHA-256, else each tensor's change over those steps within a tolerance that
float rounding (another CPU's kernels, another thread count) stays far inside and a change of the recipe exceeds.
So the check runs on any CPU. It skips only where it fails under torch or Transformers versions other than the
recorded ones, and its reason names them.
"""

from __future__ import annotations

import hashlib
import json
import re
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


def test_recorded_final_fingerprint_is_that_of_the_bundled_weights() -> None:
    """The recorded SHA-256 describes the shipped file, so a rebuild that matches it matches the bundled model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(BUNDLED / "model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == METADATA["weights_sha256_after_steps"]["final"]


def _check(reference_dir: Path = BUNDLED) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check-reproduction", "--compare-with", str(reference_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPOSITORY,
    )


def _skip_if_versions_differ(result: subprocess.CompletedProcess) -> None:
    """A failure under other torch or Transformers versions is not the recipe's: skip, naming the mismatch."""
    recorded = METADATA["reproduction_check"]["versions"]
    here = {"torch": torch.__version__, "transformers": transformers.__version__}
    mismatch = [f"{name} {here[name]} here, {recorded[name]} recorded" for name in here if here[name] != recorded[name]]
    if result.returncode != 0 and mismatch:
        pytest.skip(f"did NOT reproduce, under other versions ({'; '.join(mismatch)}): {_last_line(result)}")


def _last_line(result: subprocess.CompletedProcess) -> str:
    return (result.stdout.strip().splitlines() or [result.stderr[-500:]])[-1]


def _recipe_copy(tmp_path: Path, old: str, new: str) -> Path:
    """A folder whose training_metadata.json records the bundled model's command with one flag changed."""
    metadata = dict(METADATA, made_by=METADATA["made_by"].replace(old, new))
    assert metadata["made_by"] != METADATA["made_by"]
    (tmp_path / "training_metadata.json").write_text(json.dumps(metadata))
    return tmp_path


def test_first_training_steps_rebuild_the_recorded_weights() -> None:
    result = _check()
    _skip_if_versions_differ(result)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^reproduced (bit for bit|within float rounding): after 20 steps", result.stdout, re.M)


def test_float_rounding_alone_still_counts_as_reproduced(tmp_path: Path) -> None:
    """Two threads sum in another order: the weights differ in their last bits, as on a CPU with other kernels."""
    result = _check(_recipe_copy(tmp_path, "--threads 1", "--threads 2"))
    _skip_if_versions_differ(result)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "reproduced" in _last_line(result)


def test_a_changed_recipe_is_not_reproduced(tmp_path: Path) -> None:
    """A learning rate 1% higher moves the weights far beyond float rounding: the check fails."""
    result = _check(_recipe_copy(tmp_path, "--learning-rate 0.003 ", "--learning-rate 0.00303 "))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert _last_line(result).startswith("NOT reproduced: after 20 steps the weights differ")
