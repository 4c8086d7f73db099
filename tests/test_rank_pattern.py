"""A rank per MoE block (``PerftConfig(rank_pattern=...)``) and `peft_perft.selection.spread_rank`, which spreads a
parameter budget over the blocks by their routing entropy."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny
from peft import PeftModel, get_peft_model
from test_architectures import _input_ids

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.selection import ExpertSelection, routing_entropy, spread_rank

FIRST, SECOND = "model.layers.0.mlp", "model.layers.1.mlp"


def adapted_block(model: torch.nn.Module, layer: int) -> PerftMoeBlock:
    return model.get_base_model().model.layers[layer].mlp


def logits_and_gradients(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    output = model(input_ids=_input_ids(), labels=_input_ids())
    output.loss.backward()
    return output.logits.detach(), [p.grad for n, p in sorted(model.named_parameters()) if p.requires_grad]


@pytest.mark.parametrize("variant", ["R", "E"])
def test_each_block_is_the_uniform_rank_adapter_of_its_rank(variant: str):
    """Block 0 at r=2 and block 1 at r=6 give what a model made of an r=2 adapter's block 0 and an r=6 adapter's
    block 1 gives (same lora_alpha, so each block scales by lora_alpha / its rank): logits and gradients."""
    experts = 4 if variant == "R" else None
    settings = {"variant": variant, "lora_alpha": 8, "init_weights": False, "num_experts": experts}
    base = build_tiny()
    torch.manual_seed(0)
    patterned = get_peft_model(copy.deepcopy(base), PerftConfig(r=2, rank_pattern={SECOND: 6}, **settings))
    assert [adapted_block(patterned, layer).perft_A["default"].shape[1] for layer in (0, 1)] == [2, 6]
    assert adapted_block(patterned, 1).perft_configs["default"].scaling == 8 / 6
    reference = get_peft_model(copy.deepcopy(base), PerftConfig(r=2, **settings))
    at_six = get_peft_model(copy.deepcopy(base), PerftConfig(r=6, **settings))
    reference.get_base_model().model.layers[1].mlp = adapted_block(at_six, 1)
    with torch.no_grad():
        for layer in (0, 1):
            source, target = adapted_block(reference, layer), adapted_block(patterned, layer)
            for tensors in ("perft_A", "perft_B", "perft_router"):
                if "default" in getattr(source, tensors):
                    getattr(target, tensors)["default"].copy_(getattr(source, tensors)["default"])
    logits, gradients = logits_and_gradients(patterned)
    reference_logits, reference_gradients = logits_and_gradients(reference)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-6)
    assert len(gradients) == len(reference_gradients) == (6 if variant == "R" else 4)
    for gradient, expected in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("rank_pattern", "message"),
    [({FIRST: 0}, "positive rank"), ({"model.layers.9.mlp": 4}, r"rank_pattern names \['model.layers.9.mlp'\]")],
)
def test_refuses_ranks_the_model_cannot_take(rank_pattern: dict, message: str):
    with pytest.raises(ValueError, match=message):
        get_peft_model(build_tiny(), PerftConfig(variant="R", rank_pattern=rank_pattern))


def test_routing_entropy():
    assert routing_entropy([0.5, 0.5, 0.5, 0.5]) == pytest.approx(1.0)
    assert routing_entropy([2.0, 0.0, 0.0, 0.0]) == 0.0
    assert routing_entropy([1.0, 1.0, 0.0, 0.0]) == pytest.approx(0.5)


SELECTION = ExpertSelection(
    experts={FIRST: [0, 1], SECOND: [0]}, loads={FIRST: [1.0, 1.0, 1.0, 1.0], SECOND: [1.0, 1.0, 0.0, 0.0]}, rule="-"
)
"""Entropy 1 in the first block, 0.5 in the second; two selected experts in the first, one in the second."""


def test_spread_rank_by_hand():
    # E, hidden 10: a rank unit costs 2 * 10 * 2 = 40 parameters in the first block and 20 in the second; ranks in
    # proportion 1 : 0.5 filling 1,000 parameters: 20 * 40 + 10 * 20.
    assert spread_rank(SELECTION, 1_000, hidden_size=10) == {FIRST: 20, SECOND: 10}
    # R with 2 experts: 40 per rank unit in each block, plus 2 routers of 2 x 10: 10 * 40 + 5 * 40 + 40 = 640.
    assert spread_rank(SELECTION, 640, hidden_size=10, variant="R", num_experts=2) == {FIRST: 10, SECOND: 5}


def test_spread_rank_on_a_real_selective_adapter_meets_the_budget():
    """On the tiny OLMoE (hidden 32): the config built from the spread has the budget's parameters (to rounding)."""
    ranks = spread_rank(SELECTION, 4_000, hidden_size=32)
    model = get_peft_model(build_tiny(), SELECTION.config(r=8, rank_pattern=ranks))
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == ranks[FIRST] * 2 * 32 * 2 + ranks[SECOND] * 2 * 32
    assert abs(counted - 4_000) <= 2 * 32 * 2  # within one rank unit of a block
    assert ranks[FIRST] > ranks[SECOND]


def test_saved_adapter_reloads_and_its_card_lists_each_blocks_rank(tmp_path):
    config = PerftConfig(variant="R", r=4, rank_pattern={SECOND: 12}, init_weights=False)
    model = get_peft_model(build_tiny(), config).eval()
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert f"| rank per MoE block (rank_pattern) | {FIRST}: 4; {SECOND}: 12 |" in card
    reloaded = PeftModel.from_pretrained(build_tiny(), tmp_path)
    assert reloaded.peft_config["default"].rank_pattern == {SECOND: 12}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_input_ids()).logits, model(input_ids=_input_ids()).logits)
