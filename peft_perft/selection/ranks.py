"""`spread_rank`: a total parameter budget spread over the MoE blocks by how spread their routing is."""

from __future__ import annotations

import math

from .experts import ExpertSelection


def routing_entropy(load: list[float]) -> float:
    """The entropy of a block's routing over its experts divided by log(experts): 1 when every expert gets the same
    share, 0 when one expert gets every token."""
    total = sum(load)
    if len(load) < 2 or not total:
        return 0.0
    shares = [value / total for value in load if value > 0]
    return -sum(share * math.log(share) for share in shares) / math.log(len(load))


def spread_rank(
    selection: ExpertSelection,
    budget: int,
    hidden_size: int,
    *,
    variant: str = "E",
    num_experts: int = 8,
    min_rank: int = 1,
) -> dict[str, int]:
    """Per MoE block, a rank for ``PerftConfig(rank_pattern=...)`` such that the adapter's parameters come to about
    ``budget``, each block's rank proportional to its routing entropy (more rank where the data's routing is spread
    over more experts), at least ``min_rank``.

    ``variant="E"`` prices selective PERFT-E on the selection's experts (2 r D per selected expert); ``"R"``
    PERFT-R with ``num_experts`` adapter experts per block (2 r D each, plus its router's N D, which no rank
    changes). Rounding leaves the total within one rank unit per block of the budget. Under selective E, blocks
    without a selected expert get no rank (they are not adapted)."""
    if variant not in ("E", "R"):
        raise ValueError(f"spread_rank: variant={variant!r}; the routing-based spread is for 'E' and 'R'.")
    per_rank = {
        block: 2 * hidden_size * _adapter_experts(selection, block, variant, num_experts) for block in selection.loads
    }
    blocks = [block for block, units in per_rank.items() if units]  # selective E: blocks with selected experts
    fixed = num_experts * hidden_size * len(blocks) if variant == "R" else 0
    weights = {block: routing_entropy(selection.loads[block]) for block in blocks}
    weighted_units = sum(weights[block] * per_rank[block] for block in blocks)
    if budget <= fixed or not weighted_units:
        raise ValueError(
            f"spread_rank: a budget of {budget:,} parameters leaves nothing to spread (fixed {fixed:,}, routing "
            f"entropy 0 in every block); give a larger budget or set one rank for every block."
        )
    scale = (budget - fixed) / weighted_units
    return {block: max(min_rank, round(scale * weights[block])) for block in blocks}


def _adapter_experts(selection: ExpertSelection, block: str, variant: str, num_experts: int) -> int:
    return len(selection.experts.get(block, [])) if variant == "E" else num_experts
