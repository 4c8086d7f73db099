"""PERFT-E computed inside the base experts' grouped_mm dispatch agrees with the forward-hook path it replaces.

The reference is the same model with the in-dispatch wrapper removed, so that the experts run Transformers' own
grouped_mm implementation unchanged and the hook adds the adapters through the dispatch backends (which
tests/test_dispatch.py checks against a hand-written loop)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from test_architectures import COVERED, PERFT_E_UNAVAILABLE, _input_ids, _single_thread, tiny_model  # noqa: F401

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.dispatch import in_experts as experts_dispatch

NOT_FUSED = {
    "dbrx": "its experts are a plain module, not one of Transformers' experts-interface classes",
    "ergo": "its experts subclass overrides the interface's forward (one route per row, a per-expert norm before "
    "the weighted sum), which grouped_mm's rebuild would skip",
    "inkling_text": "its router has zero-compute slots past the weighted experts",
    "longcat_flash": "its router has zero-compute (identity) expert slots",
    "zaya": "its router has a skip slot past the weighted experts",
    "jetmoe": "its experts are called with token groups; PERFT-E reads the routing from the router's output",
    "llama4": "its experts' input is pre-scaled by the routing; PERFT-E reads it from the router's output",
    "llama4_text": "its experts' input is pre-scaled by the routing; PERFT-E reads it from the router's output",
}
"""Architectures where PERFT-E is added after the experts call rather than inside grouped_mm, with the reason."""

E_ARCHITECTURES = [t for t in COVERED if t not in PERFT_E_UNAVAILABLE]


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the calls of the in-dispatch computation."""
    calls: list[int] = []
    original = experts_dispatch.grouped_experts_with_adapters

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(experts_dispatch, "grouped_experts_with_adapters", counting)
    return calls


def _hook_only_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, PerftMoeBlock):
            experts_dispatch.uninstall(module.spec.experts_module(module.base_layer))
    return reference


def _train_step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    return output.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", E_ARCHITECTURES)
def test_in_dispatch_matches_hook_path(model_type: str, fused_calls: list[int]):
    """Same logits and adapter gradients as the hook path, on every architecture that has PERFT-E; the
    in-dispatch path runs everywhere except the architectures listed in NOT_FUSED, where the wrapped forward adds
    the adapters after the experts call."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(model_type), PerftConfig(variant="E", r=4, lora_alpha=8, init_weights=False))
    reference = _hook_only_copy(model)
    input_ids = _input_ids()
    logits, gradients = _train_step(model, input_ids)
    ran_in_dispatch = len(fused_calls)
    reference_logits, reference_gradients = _train_step(reference, input_ids)
    assert len(fused_calls) == ran_in_dispatch, "the reference must not use the in-dispatch path"
    assert (ran_in_dispatch > 0) == (model_type not in NOT_FUSED)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == reference_gradients.keys() and gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference_gradients[name], rtol=1e-4, atol=1e-5)


def test_in_dispatch_bf16_and_dropout_match_hook_path(fused_calls: list[int]):
    """bf16 within bf16 tolerance, and the same dropout masks (the adapter input is dropped once per token, before
    the gather, as on the hook path)."""
    config = PerftConfig(variant="E", r=8, lora_alpha=16, init_weights=False, lora_dropout=0.3)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("olmoe").to(torch.bfloat16), config)
    reference = _hook_only_copy(model)
    input_ids = _input_ids()
    torch.manual_seed(5)
    logits, gradients = _train_step(model, input_ids)
    torch.manual_seed(5)
    reference_logits, reference_gradients = _train_step(reference, input_ids)
    assert fused_calls
    torch.testing.assert_close(logits, reference_logits, rtol=2e-2, atol=2e-2)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference_gradients[name], rtol=5e-2, atol=5e-3)


def test_other_implementation_chosen_later_falls_back_to_hook(fused_calls: list[int]):
    """The wrapper reads the user's implementation at every call: after switching to eager the adapter is still
    added (after the eager experts call), to the same logits."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("qwen3_moe"), PerftConfig(variant="E", r=4, init_weights=False)).eval()
    input_ids = _input_ids()
    with torch.no_grad():
        grouped = model(input_ids=input_ids).logits
        assert fused_calls
        fused_calls.clear()
        model.get_base_model().set_experts_implementation("eager")
        eager = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    assert not fused_calls
    torch.testing.assert_close(eager, grouped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager, base, atol=1e-4)


def test_unload_restores_experts_forward_and_deepcopy_rebinds():
    """unload gives the experts their class forward back; a deep copy's wrapper drives the copy's own adapter."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("olmoe"), PerftConfig(variant="E", r=4, init_weights=False)).eval()
    input_ids = _input_ids()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        for name, parameter in copied.named_parameters():
            if "perft_B" in name:
                parameter.zero_()
        assert torch.equal(model(input_ids=input_ids).logits, before)
        with copied.disable_adapter():
            base = copied(input_ids=input_ids).logits
        torch.testing.assert_close(copied(input_ids=input_ids).logits, base, rtol=0, atol=1e-6)
    experts = [m.spec.experts_module(m.base_layer) for m in model.modules() if isinstance(m, PerftMoeBlock)]
    assert all("forward" in vars(module) for module in experts)
    model.unload()
    assert all("forward" not in vars(module) and not module._forward_hooks for module in experts)


def test_named_dispatch_backend_keeps_the_adapter_out_of_the_grouped_dispatch(fused_calls: list[int]):
    """dispatch_backend='dense' is honoured (the adapter goes through that backend), to the same logits as auto."""
    input_ids = _input_ids()
    logits = {}
    for backend in ("dense", "auto"):
        base = tiny_model("olmoe")
        torch.manual_seed(0)  # after building the base, whose first build (cached) draws from the generator
        config = PerftConfig(variant="E", r=4, init_weights=False, dispatch_backend=backend)
        model = get_peft_model(base, config).eval()
        with torch.no_grad():
            logits[backend] = model(input_ids=input_ids).logits
        assert bool(fused_calls) == (backend == "auto")
    torch.testing.assert_close(logits["dense"], logits["auto"], rtol=1e-5, atol=1e-5)


def test_cpu_decode_step_adds_the_adapter_after_the_experts_call(fused_calls: list[int]):
    """On CPU a one-token call (a decode step) skips the in-dispatch path, whose grouped GEMMs loop over every
    expert there, and gets the adapter from the gather backend after the experts call: the same output as a
    hand-written sum over the base routing, sum_k w_k * scaling * B_e A_e h."""
    torch.manual_seed(0)
    config = PerftConfig(variant="E", r=4, lora_alpha=8, init_weights=False)
    model = get_peft_model(tiny_model("olmoe"), config).eval()
    block = next(m for m in model.modules() if isinstance(m, PerftMoeBlock))
    hidden = torch.randn(1, 1, block.spec.hidden_size)
    with torch.no_grad():
        adapted = block(hidden)
        _, weights, indices = block.base_layer.gate(hidden.view(1, -1))
        with model.disable_adapter():
            base = block(hidden)
    lora_A, lora_B = block.perft_A["default"], block.perft_B["default"]
    pairs = zip(weights[0], indices[0].tolist(), strict=True)
    terms = [w * lora_B[e] @ (lora_A[e] @ hidden.view(-1)) for w, e in pairs]
    expected = base + config.scaling * torch.stack(terms).sum(0).view_as(base)
    assert not fused_calls
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, base, atol=1e-4)
