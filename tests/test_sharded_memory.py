"""scripts/adapter_memory.py: its parameter counts are those of real PERFT adapters, and its headline figures those
of a hand computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import build_tiny
from peft import get_peft_model

from peft_perft import PerftConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import adapter_memory  # noqa: E402


@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_formula_counts_the_parameters_perft_creates(variant: str) -> None:
    """The tiny OLMoE (hidden 32, 2 MoE layers, 4 experts) with each variant attached, counted from the model."""
    experts = {"R": 3, "D": 2}.get(variant)
    config = PerftConfig(variant=variant, r=4, num_experts=experts, top_k=1 if variant == "R" else None)
    model = get_peft_model(build_tiny(), config)
    counted = sum(p.numel() for name, p in model.named_parameters() if ".perft_" in name)
    shape = adapter_memory.MoeShape("tiny", hidden_size=32, moe_layers=2, routed_experts=4, expert_width=16)
    assert adapter_memory.adapter_parameters(shape, variant, rank=4, routed=3, dense=2) == counted


def test_deepseek_v3_perft_e_figures() -> None:
    """PERFT-E at r=8 on DeepSeek-V3: 2 * 256 experts * 8 * 7168 * 58 layers parameters, 16 bytes each to train."""
    table = adapter_memory.rows(rank=8, routed=8, dense=4, ep_degrees=[64])
    row = next(row for row in table if row[0] == "DeepSeek-V3" and row[1].startswith("E"))
    parameters = 2 * 256 * 8 * 7168 * 58
    assert row[2] == f"{parameters / 1e6:,.1f}M"
    assert row[3] == f"{parameters * 16 / 2**30:,.2f}"
    assert row[4].startswith(f"{parameters * 16 / 2**30 / 64:,.2f} ")


def test_selective_perft_e_rows_count_a_real_selective_adapter() -> None:
    """The "E sel." rows: a share of each block's experts, counted as a real selective adapter on the tiny OLMoE;
    under EP the range runs from an even spread to the busiest rank (its local experts all selected)."""
    shape = adapter_memory.MoeShape("tiny", hidden_size=32, moe_layers=2, routed_experts=4, expert_width=16)
    selected = adapter_memory.selected_experts(shape, 0.5)
    selection = {f"model.layers.{layer}.mlp": list(range(selected)) for layer in range(2)}
    model = get_peft_model(build_tiny(), PerftConfig(variant="E", r=4, target_experts=selection))
    counted = sum(p.numel() for name, p in model.named_parameters() if ".perft_" in name)
    row = adapter_memory.selective_row(shape, rank=4, share=0.5, ep_degrees=[4])
    assert row[2] == f"{counted / 1e6:,.1f}M" and row[1].startswith("E sel. (50%: 2 experts")
    # 4 ranks of 1 local expert each: evenly a quarter of the adapter per rank; the busiest holds 1 of the 2 experts.
    assert adapter_memory.selective_bytes_per_rank(shape, rank=4, share=0.5, ep=4) == (counted * 16 / 4, counted * 8)
