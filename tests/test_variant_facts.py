"""The variants' facts on `PerftConfig` (the tools read them there) agree with what real adapters hold and do."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftConfig, PerftMoeBlock

SETTINGS = [
    ("olmoe", {"variant": "R"}),
    ("mixtral", {"variant": "R", "num_experts": 5, "top_k": 3}),
    ("olmoe", {"variant": "E"}),
    ("mixtral", {"variant": "E", "r": 2}),
    ("olmoe", {"variant": "D"}),
    ("mixtral", {"variant": "D", "num_experts": 3}),
    ("olmoe", {"variant": "S", "r": 4}),
    ("olmoe", {"variant": "R", "adapter_type": "parallel_adapter"}),
]
"""Both tiny families (4 experts, top-2, hidden 32, 2 MoE layers), each variant, defaults and explicit sizes."""


def _peft_model(family: str, settings: dict) -> tuple[torch.nn.Module, PerftConfig]:
    config = PerftConfig(**settings)
    return get_peft_model(build_tiny(family), config), config


@pytest.mark.parametrize(("family", "settings"), SETTINGS)
def test_trainable_parameter_formula_counts_the_real_model(family: str, settings: dict) -> None:
    """The formula per block, times the adapted blocks, is what torch counts as trainable in the PEFT model."""
    model, config = _peft_model(family, settings)
    blocks = [module for module in model.modules() if isinstance(module, PerftMoeBlock)]
    counted = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    spec = blocks[0].spec
    assert len(blocks) == 2 and (spec.hidden_size, spec.num_experts) == (32, 4)
    assert config.trainable_parameters_per_block(spec.hidden_size, spec.num_experts) * len(blocks) == counted


BLOCKS = ("model.layers.0.mlp", "model.layers.1.mlp")
"""The tiny OLMoE's two MoE blocks, by the name ``target_experts`` and ``rank_pattern`` key them."""


@pytest.mark.parametrize(
    "settings",
    [
        {"variant": "E", "target_experts": {BLOCKS[0]: [1, 3], BLOCKS[1]: [0]}},
        {"variant": "R", "rank_pattern": {BLOCKS[0]: 2, BLOCKS[1]: 12}},
        {"variant": "E", "target_experts": {BLOCKS[0]: [2], BLOCKS[1]: [0, 1, 3]}, "rank_pattern": {BLOCKS[1]: 4}},
    ],
)
def test_trainable_parameter_formula_per_named_block(settings: dict) -> None:
    """With selected experts or a rank per block, the formula per block name sums to what torch counts."""
    model, config = _peft_model("olmoe", settings)
    counted = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert sum(config.trainable_parameters_per_block(32, 4, block) for block in BLOCKS) == counted


@pytest.mark.parametrize(("family", "settings"), SETTINGS)
def test_routing_facts_match_what_a_forward_pass_does(family: str, settings: dict) -> None:
    """Routed variants record one routing per token with ``routed_top_k`` experts; the others record none and run
    every expert they hold; only R holds a router."""
    model, config = _peft_model(family, settings)
    model(torch.randint(3, 64, (2, 7)))
    block = next(module for module in model.modules() if isinstance(module, PerftMoeBlock))
    held = block.perft_A["default"].shape[0]
    active = config.active_experts_per_token(block.spec.num_experts, block.spec.top_k)
    assert config.has_own_router == ("default" in block.perft_router)
    if config.is_routed:
        assert block.routing_records["default"].expert_index.shape == (14, active)
        assert active == config.routed_top_k(block.spec.top_k) < held
    else:
        assert "default" not in block.routing_records and config.routed_top_k(block.spec.top_k) is None
        assert active == held
