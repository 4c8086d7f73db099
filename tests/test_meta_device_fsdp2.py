"""FSDP2's meta-device flow, as docs/big_models.md gives it, on two CPU processes (gloo): build on meta,
``get_peft_model``, ``fully_shard``, ``to_empty``, load the base weights, ``init_perft_weights``, train; everything
equals one process that built the model on the CPU and called ``get_peft_model`` after the same seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed" / "meta_worker.py"
VARIANTS = ["R", "E", "D", "S"]
TIMEOUT_S = 420
"""A hard limit on each launch: the start, the imports and 4 tiny cases take about 20 s on an idle 2-core machine."""


def run_worker(mode: str, output: Path) -> None:
    launcher = [sys.executable] if mode == "reference" else [sys.executable, "-m", "torch.distributed.run"]
    if mode == "meta":
        launcher += ["--nproc_per_node", "2", "--standalone"]
    command = [*launcher, str(WORKER), mode, str(output), *VARIANTS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outputs = {mode: tmp_path_factory.mktemp(mode) for mode in ("reference", "meta")}
    for mode, output in outputs.items():
        run_worker(mode, output)
    return outputs


def assert_same_tensors(found: dict, expected: dict, what: str, exact: bool = False) -> None:
    assert found.keys() == expected.keys() and expected, what
    for name, tensor in expected.items():
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(found[name], tensor, **tolerance, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device_flow_on_two_ranks_equals_one_process(variant: str, runs: dict[str, Path]) -> None:
    expected, found = (torch.load(runs[mode] / f"{variant}.pt") for mode in ("reference", "meta"))
    assert_same_tensors(found["initial"], expected["initial"], "initial adapter", exact=True)
    assert any(".perft_A." in name and tensor.abs().sum() > 0 for name, tensor in found["initial"].items())
    torch.testing.assert_close(found["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    assert_same_tensors(found["gradients"], expected["gradients"], "step-1 gradient")
    assert any(tensor.abs().sum() > 0 for tensor in found["gradients"].values())
    assert_same_tensors(found["trained"], expected["trained"], "adapter after the steps")
    moved = [name for name, tensor in found["trained"].items() if not torch.equal(tensor, found["initial"][name])]
    assert any(".perft_A." in name for name in moved) and any(".perft_B." in name for name in moved)
    expected_file, found_file = (runs[mode] / f"{variant}.adapter" / "adapter_model.safetensors" for mode in runs)
    assert_same_tensors(load_file(found_file), load_file(expected_file), "saved adapter")
    torch.testing.assert_close(found["reloaded_logits"], expected["reloaded_logits"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base_logits = build_tiny()(input_ids=torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(9)))
    assert not torch.allclose(found["reloaded_logits"], base_logits.logits, atol=1e-4), "the adapter was not loaded"
