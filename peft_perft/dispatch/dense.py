"""Dense backend: every token through every expert's down-projection, then a routing-weighted up-projection.

Exact (unselected experts get weight 0) and made of two plain GEMMs, so it is fast when N * r is small
compared with D, works with any dtype and device, and needs no sorting.
"""

from __future__ import annotations

import torch

from . import Activation, register_backend


def dense_routed(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Compute all experts' bottlenecks and scale each by the token's (possibly zero) routing weight."""
    num_experts, rank, hidden_dim = lora_A.shape
    num_tokens = hidden.shape[0]
    down = hidden @ lora_A.reshape(num_experts * rank, hidden_dim).t()
    if activation is not None:
        down = activation(down)
    gate = torch.zeros(num_tokens, num_experts, dtype=down.dtype, device=down.device)
    gate = gate.scatter_add(1, expert_index, expert_weight.to(down.dtype))
    gated = (down.view(num_tokens, num_experts, rank) * gate.unsqueeze(-1)).view(num_tokens, num_experts * rank)
    up_weight = lora_B.permute(1, 0, 2).reshape(hidden_dim, num_experts * rank)
    return gated @ up_weight.t()


def _always_supported(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    return True


register_backend("dense", dense_routed, _always_supported, priority=0)
