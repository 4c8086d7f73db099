"""bf16 end to end on the CPU: training a bf16 model (with peft's fp32 adapter, or a bf16 one) and an fp32 model
under ``torch.autocast`` gives the fp32 run's losses, gradients and trained adapter within bf16's rounding, with
each variant and each routed dispatch backend."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftConfig, PerftMoeBlock, dispatch

MODES = ["bf16_model", "bf16_model_bf16_adapter", "fp32_autocast"]
ADAPTER_DTYPE = {"bf16_model": torch.float32, "bf16_model_bf16_adapter": torch.bfloat16, "fp32_autocast": torch.float32}
STEPS = 3
LOSS_RTOL = 2e-3  # measured up to 1.2e-4
GRADIENT_RTOL = {"perft_A": 0.1, "perft_B": 0.1, "perft_router": 0.25}
"""Relative to the gradient's norm; measured up to 0.046 for A and B (PERFT-R, grouped_mm, bf16 adapter) and 0.14
for PERFT-R's router in layer 0 (bf16 model): the router's gradient sums, over tokens, differences between the
experts' outputs, and that cancellation loses more than bf16's rounding of its terms."""
TRAINED_RTOL = 3e-2  # relative to the adapter's norm after the steps; measured up to 1.7e-2 (A, PERFT-R, autocast)


def perft(variant: str, backend: str) -> PerftConfig:
    """B drawn at random, so every tensor gets a gradient at the first step; PERFT-R's router drawn wider than by
    default (std 0.5), so that fewer tokens sit near a top-k tie (the routing is compared below)."""
    routing = {"num_experts": 4, "router_init_std": 0.5} if variant == "R" else {}
    return PerftConfig(variant=variant, r=4, init_weights=False, dispatch_backend=backend, **routing)


@functools.cache
def tokens() -> torch.Tensor:
    """A batch on which no PERFT-R run here routes any token otherwise than fp32 does (seeds 3 to 7 each have a
    near tie that one of the bf16 runs breaks the other way; that is a discrete flip, not a rounding error)."""
    return torch.randint(3, 64, (STEPS, 4, 12), generator=torch.Generator().manual_seed(8))


@functools.cache
def train(variant: str, backend: str, mode: str) -> dict:
    """Three SGD steps of the tiny OLMoE; the first step's loss, gradients and routing, and every step's adapter."""
    base = build_tiny().to(torch.bfloat16) if mode.startswith("bf16_model") else build_tiny()
    torch.manual_seed(1)
    upcast = mode != "bf16_model_bf16_adapter"
    model = get_peft_model(base, perft(variant, backend), autocast_adapter_dtype=upcast).train()
    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimiser = torch.optim.SGD(list(adapter.values()), lr=0.5)
    record = {"dtypes": {p.dtype for p in adapter.values()}}
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "fp32_autocast"):
            loss = model(input_ids=tokens()[step], labels=tokens()[step]).loss
        loss.backward()
        if step == 0:
            record["loss"] = loss.item()
            record["gradients"] = {name: p.grad.float().clone() for name, p in adapter.items()}
            record["routing"] = [
                block.routing_records["default"].expert_index.sort(dim=-1).values.clone()
                for block in model.modules()
                if isinstance(block, PerftMoeBlock) and "default" in block.routing_records  # R and E route
            ]
        optimiser.step()
        optimiser.zero_grad()
    record["trained"] = {name: p.detach().float().clone() for name, p in adapter.items()}
    return record


def assert_relatively_close(found: dict, expected: dict, rtol: float | dict[str, float], what: str) -> None:
    assert found.keys() == expected.keys() and expected
    for name, tensor in expected.items():
        error = (found[name] - tensor).norm() / tensor.norm()
        bound = rtol if isinstance(rtol, float) else rtol[name.split(".")[-2]]
        assert error <= bound, f"{what} of {name}: relative error {error:.3g} > {bound}"


def check_against_fp32(variant: str, backend: str, mode: str) -> None:
    expected, found = train(variant, backend, "fp32"), train(variant, backend, mode)
    assert found["dtypes"] == {ADAPTER_DTYPE[mode]}, "the adapter's dtype is not the one peft's convention gives"
    assert all(torch.equal(a, b) for a, b in zip(found["routing"], expected["routing"], strict=True)), (
        "bf16 routed some token to other experts than fp32 (a top-k tie): the comparison below would not be "
        "one of rounding"
    )
    assert abs(found["loss"] - expected["loss"]) <= LOSS_RTOL * abs(expected["loss"])
    assert_relatively_close(found["gradients"], expected["gradients"], GRADIENT_RTOL, "step-1 gradient")
    assert_relatively_close(found["trained"], expected["trained"], TRAINED_RTOL, "trained adapter")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_bf16_training_matches_fp32_within_bf16_rounding(variant: str, mode: str) -> None:
    check_against_fp32(variant, "auto", mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["grouped_mm", "gather", "dense"])
@pytest.mark.parametrize("variant", ["R", "E"])
def test_bf16_training_matches_fp32_on_every_routed_backend(variant: str, backend: str, mode: str) -> None:
    check_against_fp32(variant, backend, mode)


def unaligned_model(dtype: torch.dtype) -> torch.nn.Module:
    """The tiny OLMoE with hidden size 36: rows of 72 bytes in bf16 (not 16-byte aligned), 144 in fp32 (aligned).
    Its own experts run eagerly: Transformers' grouped_mm for them has the same alignment rule in bf16."""
    model = build_tiny(hidden_size=36, num_attention_heads=3, num_key_value_heads=3).to(dtype)
    model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("variant", ["R", "E"])
def test_grouped_mm_on_unaligned_bf16_rows_is_refused_at_get_peft_model(variant: str) -> None:
    config = PerftConfig(variant=variant, r=4, dispatch_backend="grouped_mm")
    with pytest.raises(ValueError, match=r"grouped_mm.*hidden size 36 in torch.bfloat16 is 72 bytes.*'auto'"):
        get_peft_model(unaligned_model(torch.bfloat16), config, autocast_adapter_dtype=False)


def test_grouped_mm_on_the_same_rows_in_fp32_is_accepted_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's default upcast makes the adapter fp32, whose rows of hidden size 36 are aligned: grouped_mm runs."""
    calls = []
    grouped = dispatch._BACKENDS["grouped_mm"]
    counting = dataclasses.replace(grouped, routed=lambda *args: calls.append(1) or grouped.routed(*args))
    monkeypatch.setitem(dispatch._BACKENDS, "grouped_mm", counting)
    model = get_peft_model(
        unaligned_model(torch.bfloat16), PerftConfig(variant="E", r=4, dispatch_backend="grouped_mm")
    )
    input_ids = tokens()[0]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert calls and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_megablocks_with_peft_s_fp32_adapter_is_refused_at_get_peft_model() -> None:
    config = PerftConfig(variant="E", r=4, dispatch_backend="megablocks")
    with pytest.raises(ValueError, match=r"bf16 only.*torch.float32.*autocast_adapter_dtype=False"):
        get_peft_model(build_tiny().to(torch.bfloat16), config)
