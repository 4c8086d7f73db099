"""``torch.compile`` on PERFT models: a training step and ``generate`` compile as one graph (``fullgraph=True``, so
any graph break, in PERFT's code or elsewhere, fails) and give the eager results.

The backends are Dynamo's ``aot_eager`` (training: Dynamo and AOTAutograd trace forward and backward) and
``eager`` (generate), which check the tracing without paying for Inductor's C++ code generation on every test;
one forward per variant goes through Inductor itself. BENCHMARKS.md reports Inductor-compiled timings, made with
benchmarks/olmoe_step.py --compile."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftConfig


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perft_model(variant: str) -> torch.nn.Module:
    sizes = {"num_experts": 4, "top_k": 2} if variant == "R" else {}
    return get_peft_model(build_tiny(), PerftConfig(variant=variant, r=4, init_weights=False, **sizes))


@pytest.mark.parametrize("variant", ["R", "E"])
def test_compiled_training_step_is_one_graph_and_matches_eager(variant: str, tokens: torch.Tensor):
    model = _perft_model(variant).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=tokens, labels=tokens).loss
    loss.backward()
    expected = eager(input_ids=tokens, labels=tokens).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected_gradients = {name: p.grad for name, p in eager.named_parameters() if p.grad is not None}
    assert gradients.keys() == expected_gradients.keys() and any(".perft_router." in n for n in gradients) == (
        variant == "R"
    )
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-6)


def test_compiled_generate_is_one_graph_and_matches_eager(tokens: torch.Tensor):
    """The decode step (static KV cache, so one graph serves every position) with a PERFT-E adapter."""
    model = _perft_model("E").eval()
    eager = copy.deepcopy(model)
    base = model.get_base_model()
    base.forward = torch.compile(base.forward, fullgraph=True, backend="eager")
    settings = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    generated = model.generate(input_ids=tokens[:1], **settings)
    expected = eager.generate(input_ids=tokens[:1], **settings)
    assert torch.equal(generated, expected)
    with eager.disable_adapter():
        base_only = eager.generate(input_ids=tokens[:1], **settings)
    assert not torch.equal(expected, base_only), "the adapter must change the generated tokens"


@pytest.mark.parametrize("variant", ["E", "R"])
def test_inductor_compiled_forward_matches_eager(variant: str, tokens: torch.Tensor):
    """Inductor itself (C++ code generation), not only the tracing: its pattern matcher once turned PERFT's scaled
    addition after a matmul into an addmm that dropped the scaling, which the tracing-only backends cannot show."""
    sizes = {"num_experts": 4, "top_k": 2} if variant == "R" else {}
    config = PerftConfig(variant=variant, r=4, init_weights=False, **sizes)
    model = get_peft_model(build_tiny(num_hidden_layers=1), config).eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=tokens).logits
        with model.disable_adapter():
            base_only = model(input_ids=tokens).logits
    assert (expected - base_only).abs().max() > 0.1, "the adapter must change the logits"
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-5)
