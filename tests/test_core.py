"""PERFT's four variants against references computed here from the paper's formulas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftConfig, PerftMoeBlock


def bottleneck(h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, silu: bool) -> torch.Tensor:
    """dE_j(h) = scaling * B_j act(A_j h) for one expert (the paper's equation)."""
    down = h @ lora_A.t()
    return scaling * (F.silu(down) if silu else down) @ lora_B.t()


def base_expert(experts: torch.nn.Module, index: int, h: torch.Tensor) -> torch.Tensor:
    """E_i(h) of a Transformers-5 fused experts module (SwiGLU with [gate; up] stacked)."""
    gate, up = (h @ experts.gate_up_proj[index].t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[index].t()


def base_routing(block: torch.nn.Module, h: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing of the frozen router, recomputed from its weight."""
    probs = torch.softmax(h @ block.gate.weight.t(), dim=-1)
    weights, index = probs.topk(block.gate.top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if normalise else weights), index


def reference_block(block: PerftMoeBlock, h: torch.Tensor, name: str = "default") -> torch.Tensor:
    """y' of one adapted block, token by token, from the formulas of the PERFT paper."""
    config = block.perft_configs[name]
    base = block.base_layer
    silu = config.adapter_type == "parallel_adapter"
    lora_A, lora_B = block.perft_A[name], block.perft_B[name]
    rows = []
    for token in h:
        expert_outputs = {}
        if config.variant == "E":
            normalise = getattr(base.gate, "norm_topk_prob", True)
            weights, index = base_routing(base, token[None], normalise)
            total = torch.zeros_like(token)
            for g, i in zip(weights[0], index[0].tolist(), strict=True):
                delta = bottleneck(token, lora_A[i], lora_B[i], config.scaling, silu)
                total = total + g * (base_expert(base.experts, i, token) + delta)
            rows.append(total)
            continue
        y = base(token[None, None])[0, 0]
        if config.variant == "R":
            probs = torch.softmax(block.perft_router[name] @ token, dim=-1)
            weights, index = probs.topk(config.resolved_top_k())
            if config.normalize_top_k:
                weights = weights / weights.sum()
            for p, j in zip(weights, index.tolist(), strict=True):
                expert_outputs[j] = p * bottleneck(token, lora_A[j], lora_B[j], config.scaling, silu)
        else:
            for j in range(lora_A.shape[0]):
                expert_outputs[j] = bottleneck(token, lora_A[j], lora_B[j], config.scaling, silu)
        rows.append(y + sum(expert_outputs.values()))
    return torch.stack(rows)


def adapted_blocks(model: torch.nn.Module) -> list[PerftMoeBlock]:
    return [module for module in model.modules() if isinstance(module, PerftMoeBlock)]


CASES = [
    ("olmoe", dict(variant="S")),
    ("olmoe", dict(variant="D", num_experts=3)),
    ("olmoe", dict(variant="R", num_experts=4, top_k=2, normalize_top_k=True)),
    ("olmoe", dict(variant="R", num_experts=4, top_k=2, normalize_top_k=False)),
    ("olmoe", dict(variant="R", num_experts=3, top_k=1, adapter_type="parallel_adapter")),
    ("olmoe", dict(variant="E")),
    ("mixtral", dict(variant="E")),
    ("mixtral", dict(variant="R", num_experts=4, top_k=2)),
    ("olmoe", dict(variant="E", adapter_type="parallel_adapter")),
]


@pytest.mark.parametrize(("family", "settings"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_each_variant_matches_the_paper_formula(family: str, settings: dict) -> None:
    model = get_peft_model(build_tiny(family), PerftConfig(r=4, lora_alpha=8, init_weights=False, **settings))
    block = adapted_blocks(model)[0]
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual = block(h[None])[0]
        expected = reference_block(block, h)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, block.base_layer(h[None])[0]), "the adapter must change the output"


@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_fresh_adapter_leaves_logits_unchanged(variant: str, tokens: torch.Tensor) -> None:
    expected = build_tiny()(tokens).logits
    model = get_peft_model(build_tiny(), PerftConfig(variant=variant, r=4))
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_training_lowers_the_loss_and_changes_only_adapter_tensors(variant: str, tokens: torch.Tensor) -> None:
    model = get_peft_model(build_tiny(), PerftConfig(variant=variant, r=4, num_experts=None if variant in "ES" else 4))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "some adapter tensor must have been updated"
    assert all(".perft_" in name for name in changed), sorted(changed)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".perft_" in name for name in trainable)


def test_router_learns_from_the_language_model_loss_alone(tokens: torch.Tensor) -> None:
    config = PerftConfig(variant="R", r=4, num_experts=4, top_k=2, router_aux_loss_coef=0.0, init_weights=False)
    model = get_peft_model(build_tiny(), config)
    model(tokens, labels=tokens, output_router_logits=True).loss.backward()
    for block in adapted_blocks(model):
        assert block.perft_router["default"].grad.abs().sum() > 0


def test_perft_e_does_not_run_the_base_router_twice(tokens: torch.Tensor) -> None:
    base_logits = build_tiny()(tokens, output_router_logits=True).router_logits
    model = get_peft_model(build_tiny(), PerftConfig(variant="E", r=4, init_weights=False))
    calls = []
    for block in adapted_blocks(model):
        block.base_layer.gate.register_forward_hook(lambda *args: calls.append(1))
    outputs = model(tokens, output_router_logits=True)
    assert len(outputs.router_logits) == len(base_logits) == len(calls) == 2
    # The first layer's router sees the same input with or without the adapter.
    torch.testing.assert_close(outputs.router_logits[0], base_logits[0], rtol=0, atol=0)


def test_perft_e_hook_adds_only_inside_its_block(tokens: torch.Tensor) -> None:
    """The E hook stays on the experts between calls; a direct call of the experts module gets no adapter output."""
    model = get_peft_model(build_tiny(), PerftConfig(variant="E", r=4, init_weights=False))
    block = adapted_blocks(model)[0]
    experts = block.base_layer.experts
    hidden = torch.randn(5, 32)
    index, weight = torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5)
    with torch.no_grad():
        model(tokens)
        direct = experts(hidden, index, weight)
        frozen = build_tiny().model.layers[0].mlp.experts(hidden, index, weight)
    torch.testing.assert_close(direct, frozen, rtol=0, atol=0)


def test_router_aux_loss_is_skipped_only_where_nothing_could_use_it(tokens: torch.Tensor) -> None:
    """Generation (no labels, no gradients) pays no aux loss; evaluation with labels and training still do."""
    model = get_peft_model(build_tiny(), PerftConfig(variant="R", r=4, num_experts=4, top_k=2))
    with torch.no_grad():
        assert not hasattr(model(tokens, output_router_logits=True), "perft_aux_loss")
        assert hasattr(model(tokens, labels=tokens, output_router_logits=True), "perft_aux_loss")
    assert model(tokens, output_router_logits=True).perft_aux_loss.requires_grad


def test_router_aux_loss_matches_switch_formula_and_skips_padding(tokens: torch.Tensor) -> None:
    config = PerftConfig(variant="R", r=4, num_experts=4, top_k=2, router_aux_loss_coef=0.5)
    model = get_peft_model(build_tiny(), config)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    outputs = model(tokens, attention_mask=mask, labels=tokens, output_router_logits=True)
    real_tokens = mask.reshape(-1).bool()
    probs, dispatched = [], []
    for block in adapted_blocks(model):
        layer_input = block.routing_records["default"].router_probs.detach()
        probs.append(layer_input[real_tokens])
        chosen = layer_input.topk(2, dim=-1).indices[real_tokens]
        dispatched.append(F.one_hot(chosen, 4).sum(1).float())
    fraction = torch.cat(dispatched).mean(0)
    mean_prob = torch.cat(probs).mean(0)
    expected = 0.5 * 4 * (fraction * mean_prob).sum()
    torch.testing.assert_close(outputs.perft_aux_loss.detach(), expected)
    without = model(tokens, attention_mask=mask, labels=tokens, output_router_logits=True)
    base_only = outputs.loss - outputs.perft_aux_loss
    torch.testing.assert_close(base_only.detach(), without.loss.detach() - without.perft_aux_loss.detach())
    assert not hasattr(model(tokens, labels=tokens, output_router_logits=False), "perft_aux_loss")
    # Trainers that compute lm + coef * aux_loss themselves (TRL) get the same total.
    coef = model.config.router_aux_loss_coef
    lm_loss = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(
        (lm_loss + coef * outputs.aux_loss).detach(), outputs.loss.detach(), rtol=1e-6, atol=1e-6
    )


def test_dropout_is_active_in_training_only(tokens: torch.Tensor) -> None:
    model = get_peft_model(build_tiny(), PerftConfig(variant="S", r=4, lora_dropout=0.5, init_weights=False))
    model.eval()
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    model.train()
    torch.manual_seed(0)
    first = model(tokens).logits
    assert not torch.equal(first, model(tokens).logits)


def test_registration_survives_reimport() -> None:
    """Reloading the package (as notebooks do) neither fails nor registers PERFT twice; run apart from this process."""
    script = """
import importlib, torch, peft_perft
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from conftest import build_tiny
reloaded = importlib.reload(peft_perft)
assert list(PeftType).count(PeftType.PERFT) == 1
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PERFT] is reloaded.PerftModel
model = get_peft_model(build_tiny(), reloaded.PerftConfig(variant="S", r=4))
assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 64)
"""
    tests_dir = Path(__file__).parent
    result = subprocess.run([sys.executable, "-c", script], cwd=tests_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
