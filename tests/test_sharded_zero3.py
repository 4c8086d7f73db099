"""DeepSpeed ZeRO-3 through Accelerate on two CPU processes: PERFT-R trains and saves the adapter one process
trains on the whole batch. Needs the optional ``deepspeed`` extra (``pip install -e .[deepspeed]``), which CI
does not install: DeepSpeed's CPU backend compiles a C++ shared-memory op on first use (about 3 minutes here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="DeepSpeed is optional (extra 'deepspeed'); CI does not install it")

WORKER = Path(__file__).parent / "distributed" / "zero3_worker.py"


def run(mode: str, processes: int, output: Path) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run([*command, str(WORKER), mode, str(output)], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(output / "adapter_model.safetensors")


def test_zero3_trains_and_saves_the_one_process_adapter(tmp_path: Path) -> None:
    reference = run("single", 1, tmp_path / "single")
    sharded = run("zero3", 2, tmp_path / "zero3")
    assert sorted(sharded) == sorted(reference) and any(".perft_router" in name for name in reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded[name].float(), tensor, rtol=1e-5, atol=1e-6, msg=name)
