"""``gather`` backend: copy each token's K selected experts out of the stack and apply them with batched matmuls.

No sort, histogram or scatter: what decoding (one token per step with the KV cache) wants, since its cost is
a few small kernels. The gathered weights (T * K * 2 * r * D values) grow with the token count, so ``auto``
keeps it to decode-sized calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Activation, as_dtype, register_backend

# Measured on a 2-core AVX-512 CPU (benchmarks/dispatch_sweep.py, BENCHMARKS.md): gathering wins while the
# selected pairs are at most this many and at most half the experts (else dense reads no more weights).
_MAX_PAIRS = 32


def gather_routed(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Per token, its K experts' A as one (K*r, D) matrix times h; per pair, its B times its weighted bottleneck;
    then the K pairs of a token summed. Both gathers copy contiguous expert slices (no strided copies)."""
    num_tokens, top_k = expert_index.shape
    num_experts, rank, hidden_dim = lora_A.shape
    flat_index = expert_index.reshape(-1)
    if num_tokens == 1 and not (torch.is_grad_enabled() and expert_weight.requires_grad):
        one_token = _one_token_compiled if torch.compiler.is_compiling() else _one_token
        return one_token(hidden, lora_A, lora_B, flat_index, expert_weight, activation)
    token_A = lora_A.index_select(0, flat_index).view(num_tokens, top_k * rank, hidden_dim)
    down = torch.bmm(token_A, hidden.unsqueeze(-1)).view(num_tokens * top_k, rank, 1)
    if activation is not None:
        down = activation(down)
    gated = down * expert_weight.to(down.dtype).reshape(num_tokens * top_k, 1, 1)
    up = torch.bmm(lora_B.index_select(0, flat_index), gated)
    return up.view(num_tokens, top_k, hidden_dim).sum(dim=1)


def _one_token(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    flat_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """A decode step (no gradient for the routing weights) as row-vector products: h (1, D) times the K gathered
    A's transposed in one GEMM, each bottleneck times its B transposed, then the weights (1, K) times the K outputs
    (K, D), which weights and sums them in one matmul instead of a multiply and a sum. With weight gradients the
    batched path above runs instead: its weight gradient sums r products rather than D, which keeps half-precision
    gradients as close to the reference as the property tests require."""
    top_k, rank, hidden_dim = flat_index.numel(), lora_A.shape[1], lora_A.shape[2]
    down = F.linear(hidden, lora_A.index_select(0, flat_index).view(top_k * rank, hidden_dim))
    if activation is not None:
        down = activation(down)
    up = torch.bmm(down.view(top_k, 1, rank), lora_B.index_select(0, flat_index).transpose(1, 2))
    return torch.mm(as_dtype(expert_weight, up.dtype).view(1, top_k), up.view(top_k, hidden_dim))


def _one_token_compiled(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    flat_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """A decode step under ``torch.compile`` as two products-and-sums that index the stacked experts in place:
    Inductor turns each into one generated loop that reads the K selected experts' rows where they lie, where the
    matmul form above costs a copy of the gathered A (K * r * D values) and three external GEMM calls from
    Inductor's wrapper. Eager, this form would materialise the K * r * D products; it is for compiled code only."""
    top_k, rank = flat_index.numel(), lora_A.shape[1]
    down = (lora_A[flat_index] * hidden.view(1, 1, -1)).sum(dim=-1)
    if activation is not None:
        down = activation(down)
    gated = down * as_dtype(expert_weight, down.dtype).view(top_k, 1)
    return (lora_B[flat_index] * gated.view(top_k, 1, rank)).sum(dim=(0, 2)).view(1, -1)


def _supports(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    return hidden.dtype == lora_A.dtype


def decode_sized(num_experts: int, expert_index: torch.Tensor) -> bool:
    """Whether a routing (T, K) over ``num_experts`` experts selects so few pairs that gathering them wins."""
    return expert_index.numel() <= min(_MAX_PAIRS, num_experts // 2)


def _preferred(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """Decode-sized calls that select few of the experts."""
    return decode_sized(lora_A.shape[0], expert_index)


register_backend("gather", gather_routed, _supports, priority=10, preferred=_preferred)
