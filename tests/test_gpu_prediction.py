"""The GPU roofline predictions count the flagships' weights right: checked against Mixtral-8x7B's shape by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_prediction  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

HIDDEN, WIDTH, LAYERS, EXPERTS, TOP_K, VOCAB, HEADS, KV_HEADS = 4096, 14336, 32, 8, 2, 32000, 32, 8
"""MixtralConfig's defaults, which are Mixtral-8x7B's published shape."""


def mixtral_by_hand() -> tuple[int, int]:
    head_dim = HIDDEN // HEADS
    attention = HIDDEN * HEADS * head_dim * 2 + HIDDEN * KV_HEADS * head_dim * 2
    expert = 3 * HIDDEN * WIDTH
    per_layer_except_experts = attention + HIDDEN * EXPERTS + 2 * HIDDEN  # router and the two norms
    shared = 2 * VOCAB * HIDDEN + HIDDEN  # embeddings, untied head, final norm
    total = shared + LAYERS * (per_layer_except_experts + EXPERTS * expert)
    active = shared + LAYERS * (per_layer_except_experts + TOP_K * expert)
    return total, active


def test_mixtral_weights_and_active_weights_match_the_hand_count() -> None:
    counts = gpu_prediction.flagship_counts("mixtral")
    assert (counts.total, counts.active) == mixtral_by_hand()
    assert (counts.moe_blocks, counts.num_experts, counts.top_k, counts.hidden_size) == (LAYERS, EXPERTS, TOP_K, HIDDEN)


def test_adapter_counts_follow_the_documented_formulas() -> None:
    counts = gpu_prediction.flagship_counts("mixtral")
    rank, per_expert = 8, 2 * HIDDEN * 8
    r = gpu_prediction.adapter_counts(counts, "R", rank, routed=8, top_k=2, dense=2)
    assert (r.total, r.active) == (LAYERS * (8 * per_expert + 8 * HIDDEN), LAYERS * (2 * per_expert + 8 * HIDDEN))
    e = gpu_prediction.adapter_counts(counts, "E", rank, routed=8, top_k=2, dense=2)
    assert (e.total, e.active) == (LAYERS * EXPERTS * per_expert, LAYERS * TOP_K * per_expert)
    s = gpu_prediction.adapter_counts(counts, "S", rank, routed=8, top_k=2, dense=2)
    assert s.total == s.active == LAYERS * per_expert


def test_a_compute_bound_step_costs_the_flop_ratio() -> None:
    """At many tokens both sides are compute-bound: the overhead is 1 + 6 * adapter / (4 * frozen) active weights."""
    counts = gpu_prediction.flagship_counts("mixtral")
    adapter = gpu_prediction.adapter_counts(counts, "E", 8, routed=8, top_k=2, dense=2)
    expected = 1 + 6 * adapter.active / (4 * counts.active)
    assert gpu_prediction.step_overhead(counts, adapter, tokens=10**6) == pytest.approx(expected)
