"""DeepSpeed ZeRO-3 through Accelerate on two CPU processes: PERFT trains and saves the adapter one process trains
on the whole batch, with the model loaded whole (``zero3_init_flag=False``) or under ``zero.Init``
(``zero3_init_flag=True``, every base weight a partitioned placeholder when PERFT adapts it). Needs DeepSpeed
(the ``deepspeed`` extra); its CPU backend compiles a C++ shared-memory op on first use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (extra 'deepspeed', part of 'test')")

WORKER = Path(__file__).parent / "distributed" / "zero3_worker.py"


def run(mode: str, variant: str, processes: int, base: Path, output: Path) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    arguments = [str(WORKER), mode, variant, str(base), str(output)]
    result = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(output / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny OLMoE saved once, loaded by every run with ``from_pretrained`` (under ``zero.Init`` where asked)."""
    folder = tmp_path_factory.mktemp("zero3") / "base"
    build_tiny().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process(base: Path) -> Callable[[str], dict[str, torch.Tensor]]:
    """The adapter one process reaches on the whole batch, per variant (computed on first use)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def reference(variant: str) -> dict[str, torch.Tensor]:
        if variant not in cache:
            cache[variant] = run("single", variant, 1, base, base.parent / f"single-{variant}")
        return cache[variant]

    return reference


@pytest.mark.parametrize(("variant", "mode"), [("R", "zero3"), ("R", "zero3-init"), ("E", "zero3-init")])
def test_zero3_trains_and_saves_the_one_process_adapter(
    variant: str, mode: str, base: Path, one_process: Callable[[str], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Saved through Accelerate's ``get_state_dict`` (as the Trainer does) and by ``save_pretrained`` on every rank."""
    reference = one_process(variant)
    through_accelerate = run(mode, variant, 2, base, tmp_path / mode)
    plain = load_file(tmp_path / mode / "plain" / "adapter_model.safetensors")
    assert any(".perft_A" in name for name in reference)
    assert any(".perft_router" in name for name in reference) == (variant == "R")
    for saved in (through_accelerate, plain):
        assert sorted(saved) == sorted(reference)
        for name, tensor in reference.items():
            torch.testing.assert_close(saved[name].float(), tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_with_a_zero3_config_trains_and_saves_the_one_process_adapter(
    base: Path, one_process: Callable[[str], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """transformers.Trainer with ``TrainingArguments(deepspeed=<ZeRO-3 dict>)`` made before ``from_pretrained`` (the
    model loads under ``zero.Init``): 2 ranks on halves of each batch save, through ``save_model``, the adapter one
    process reaches on the whole batch. A save that cannot gather (rank 0 plain, rank 1 ``is_main_process=False``)
    fails on rank 0 with PERFT's error, and both ranks finish, instead of hanging."""
    reference = one_process("R")
    worker = WORKER.parent / "zero3_trainer_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    result = subprocess.run([*command, "R", str(base), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(saved[name].float(), tensor, rtol=1e-5, atol=1e-6, msg=name)
    error = (tmp_path / "mixed_save_error.txt").read_text()
    assert "ranks [1] did not come to it" in error and "is_main_process=False" in error
    assert not (tmp_path / "mixed" / "adapter_model.safetensors").exists()
