"""Accelerate on two CPU processes (gloo): DDP and FSDP2 train the same adapter as one process on the same batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"


def run_worker(mode: str, processes: int, output: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--standalone", str(WORKER), mode, str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(output)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("single") / "adapter.pt"
    return {**run_worker("ddp", 1, output), "path": output}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_train_the_same_adapter_as_one(mode: str, single_process: dict, tmp_path: Path) -> None:
    distributed = run_worker(mode, 2, tmp_path / "adapter.pt")
    reference = single_process["trained"]
    assert sorted(distributed["trained"]) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(distributed["trained"][name], tensor, rtol=1e-5, atol=1e-6)
    # save_pretrained from every rank (FSDP2: the adapter's DTensors gathered) writes the one-process adapter.
    saved = load_file(tmp_path / "adapter.pt.adapter" / "adapter_model.safetensors")
    expected = load_file(Path(f"{single_process['path']}.adapter") / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-5, atol=1e-6)
    moved = [name for name, tensor in reference.items() if not torch.equal(tensor, single_process["initial"][name])]
    assert any(".perft_B." in name for name in moved) and any(".perft_router." in name for name in moved)
