"""`peft_perft.selection` picks the experts a dataset's routing uses, on a model whose routing is set by construction.

The tiny OLMoE's token embeddings carry a large +20 or -20 in one dimension, and each router reads only that
dimension, so every token's experts are known before the model runs: in block 0 a "plus" token goes to experts
{2, 3} and a "minus" token to {0, 1}; block 1 the other way round. Three quarters of the tokens are "plus".
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftMoeBlock
from peft_perft.selection import ExpertSelection, experts_carrying, select_experts, top_experts

SIGN_DIMENSION = 5
PLUS_TOKENS = list(range(3, 33))
MINUS_TOKENS = list(range(33, 64))


def routed_by_construction() -> torch.nn.Module:
    """The tiny OLMoE (4 experts, top-2) with the routing described in the module docstring."""
    model = build_tiny("olmoe")
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[PLUS_TOKENS, SIGN_DIMENSION] = 20.0
        embeddings[MINUS_TOKENS, SIGN_DIMENSION] = -20.0
        for layer, (first, second) in zip(model.model.layers, [(2, 3), (0, 1)], strict=True):
            router = layer.mlp.gate.weight
            router.zero_()
            router[first, SIGN_DIMENSION] = 2.0  # plus tokens: the top two logits; minus tokens: the two lowest
            router[second, SIGN_DIMENSION] = 1.0
    return model


def three_quarters_plus() -> dict[str, torch.Tensor]:
    """Two batches' worth of token ids: 3 of every 4 tokens from PLUS_TOKENS."""
    generator = torch.Generator().manual_seed(0)
    plus = torch.tensor(PLUS_TOKENS)[torch.randint(len(PLUS_TOKENS), (4, 6), generator=generator)]
    minus = torch.tensor(MINUS_TOKENS)[torch.randint(len(MINUS_TOKENS), (4, 2), generator=generator)]
    return {"input_ids": torch.cat([plus, minus], dim=1)}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # Shares of the routing per block: the two "plus" experts 0.375 each, the two "minus" experts 0.125 each.
        ({"mass": 0.75}, {"model.layers.0.mlp": [2, 3], "model.layers.1.mlp": [0, 1]}),
        ({}, {"model.layers.0.mlp": [0, 2, 3], "model.layers.1.mlp": [0, 1, 2]}),  # 0.8: a third expert, lowest id
        ({"top_k": 1}, {"model.layers.0.mlp": [2], "model.layers.1.mlp": [0]}),
        ({"mass": 1.0}, {"model.layers.0.mlp": [0, 1, 2, 3], "model.layers.1.mlp": [0, 1, 2, 3]}),
    ],
)
def test_selects_the_experts_the_routing_uses(rule: dict, expected: dict):
    selection = select_experts(routed_by_construction(), three_quarters_plus(), **rule)
    assert selection.experts == expected
    for block in expected:
        assert selection.loads[block] == pytest.approx(
            [0.25, 0.25, 0.75, 0.75] if block == "model.layers.0.mlp" else [0.75, 0.75, 0.25, 0.25]
        )


def test_leaves_the_base_model_as_it_was_and_writes_the_config(tmp_path):
    model = routed_by_construction()
    batch = three_quarters_plus()
    with torch.no_grad():
        before = model(**batch).logits
    selection = select_experts(model, batch, mass=0.75, description="the constructed batch")
    assert not any(isinstance(module, PerftMoeBlock) for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    config = selection.config(r=4)
    assert config.variant == "E" and config.target_experts == selection.experts and config.r == 4
    assert config.target_experts_source == (
        "per MoE block the fewest experts receiving 75% of the routing, measured on the constructed batch"
    )
    assert selection.covered_mass() == pytest.approx({"model.layers.0.mlp": 0.75, "model.layers.1.mlp": 0.75})
    adapted = get_peft_model(model, config)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * 2 * (2 * 4 * 32)
    saved = json.loads(selection.save_json(tmp_path / "selection.json").read_text())
    assert ExpertSelection(**saved) == selection
    adapted.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| adapter experts per MoE block | 2 to 2 (selected) |" in card
    assert "| adapted base experts | 4 of 8 in the adapted blocks: model.layers.0.mlp: [2, 3]; " in card
    assert f"| experts chosen by | {config.target_experts_source} |" in card


def test_rules_on_plain_loads():
    assert experts_carrying([0.1, 0.5, 0.3, 0.1], 0.8) == [1, 2]
    assert experts_carrying([0.1, 0.5, 0.3, 0.1], 0.81) == [0, 1, 2]
    assert experts_carrying([0.0, 0.0], 0.8) == []
    assert top_experts([0.2, 0.2, 0.6], 2) == [0, 2]


@pytest.mark.parametrize(
    ("rule", "message"),
    [({"mass": 0.8, "top_k": 2}, "not both"), ({"mass": 0.0}, r"must be in \(0, 1\]"), ({"top_k": 0}, "at least 1")],
)
def test_refuses_rules_that_say_nothing(rule: dict, message: str):
    with pytest.raises(ValueError, match=message):
        select_experts(build_tiny("olmoe"), three_quarters_plus(), **rule)
