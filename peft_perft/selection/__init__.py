"""Which experts to adapt: measure a dataset's routing on the frozen base model and pick, per MoE block, the experts
that carry most of it, for selective PERFT-E (``PerftConfig(variant="E", target_experts=...)``).

`select_experts` runs the routing monitor (`peft_perft.monitor.routing_report`) over the data and returns an
`ExpertSelection`, whose `ExpertSelection.config` writes the choice, and how it was made, into a `PerftConfig`.
`spread_rank` spreads a parameter budget over the blocks by their routing entropy, for ``rank_pattern``.
"""

from .experts import ExpertSelection, experts_carrying, select_experts, top_experts
from .ranks import routing_entropy, spread_rank

__all__ = ["ExpertSelection", "experts_carrying", "routing_entropy", "select_experts", "spread_rank", "top_experts"]
