"""Shared pieces of the sorted backends: expert-major pair order, rank padding, per-token sums, and the cost
model that tells `auto` when sorting pays off."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import needs_gradients

# Cost model of one routed call in nanoseconds, fitted to benchmarks/dispatch_sweep.py on the quiet 2-core
# AVX-512 CPU of BENCHMARKS.md (fp32, hidden 512), for forward + backward (True) and forward only (False):
# the dense backend costs about DENSE per token * expert * rank * hidden unit (two large GEMMs); the sorted
# path about PAIR per (token, expert) pair * hidden unit (gathering and scattering D-wide rows, memory-bound)
# plus PAIR_RANK per pair * rank * hidden unit (its small GEMMs) plus a fixed EXTRA (sort, per-group launches).
_COSTS_NS = {
    True: {"dense": 0.044, "pair": 5.3, "pair_rank": 0.055, "extra": 350_000},
    False: {"dense": 0.0141, "pair": 3.0, "pair_rank": 0.01, "extra": 100_000},
}


@dataclass(frozen=True)
class ExpertSortedPairs:
    """The T*K (token, choice) pairs of a routing, ordered by expert so that each expert's rows are contiguous.

    ``order[s]`` is the flat (token * K + choice) position of sorted pair ``s`` and ``token[s]`` its token;
    ``offsets[e]`` (int32, as grouped GEMMs want) is the end of expert ``e``'s rows and ``empty[e]`` says that
    expert ``e`` got no rows at all.
    """

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    empty: torch.Tensor


@torch.no_grad()
def sort_pairs_by_expert(expert_index: torch.Tensor, num_experts: int) -> ExpertSortedPairs:
    """Sort the routing's pairs by expert; stable, so each expert sees its tokens in their original order.

    Group ends come from ``searchsorted`` on the sorted ids rather than ``bincount``: deterministic on every
    device (no atomics) and already cumulative.
    """
    top_k = expert_index.shape[1]
    sorted_experts, order = torch.sort(expert_index.reshape(-1), stable=True)
    offsets, empty = group_ends(sorted_experts, num_experts)
    return ExpertSortedPairs(order=order, token=order // top_k, offsets=offsets, empty=empty)


@torch.no_grad()
def group_ends(sorted_experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's group end (int32, N) in expert ids sorted ascending, and which groups are empty (N, 1, 1).

    ``searchsorted`` rather than ``bincount``: deterministic on every device (no atomics), already cumulative,
    and of static shape N whatever the ids, so ``torch.compile`` traces it without a graph break (``bincount``'s
    output length depends on the largest id)."""
    expert_ids = torch.arange(num_experts, device=sorted_experts.device, dtype=sorted_experts.dtype)
    ends = torch.searchsorted(sorted_experts, expert_ids, right=True)
    starts = torch.searchsorted(sorted_experts, expert_ids, right=False)
    return ends.to(torch.int32), (ends == starts).view(-1, 1, 1)


def sorting_pays_off(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """Whether the sorted path should beat the dense one under the cost model above.

    Sorting saves the (N - K) unselected experts' GEMM work per token but pays per selected pair for moving
    D-wide rows; on this CPU it wins once N * r / K exceeds roughly 150 in training (250 in inference).
    """
    costs = _COSTS_NS[needs_gradients(hidden, lora_A)]
    tokens, top_k = expert_index.shape
    experts, rank, hidden_dim = lora_A.shape
    dense_ns = costs["dense"] * tokens * experts * rank * hidden_dim
    sorted_ns = tokens * top_k * hidden_dim * (costs["pair"] + costs["pair_rank"] * rank) + costs["extra"]
    return sorted_ns < dense_ns


def pad_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the rank of A (N, r, D) and B (N, D, r) to a multiple of ``multiple``.

    Exact for any activation: a padded rank row gives some ``act(0)`` that only ever meets a zero column of B.
    The pad is differentiable, so the gradients of the real A and B come back through the slice.
    """
    extra = -lora_A.shape[1] % multiple
    if extra == 0:
        return lora_A, lora_B
    return (
        torch.nn.functional.pad(lora_A, (0, 0, 0, extra)),
        torch.nn.functional.pad(lora_B, (0, extra)),
    )


def sum_pairs_per_token(pair_rows: torch.Tensor, pairs: ExpertSortedPairs, num_tokens: int) -> torch.Tensor:
    """Add each sorted pair's row (S, D) into its token's row (T, D).

    On CPU ``index_add`` is deterministic and the cheapest; elsewhere it would use atomics (nondeterministic and,
    in bf16, accumulated in bf16), so there the rows go back to token-major order and are summed over K.
    """
    if pair_rows.device.type == "cpu":
        return pair_rows.new_zeros(num_tokens, pair_rows.shape[1]).index_add_(0, pairs.token, pair_rows)
    return sum_in_token_order(pair_rows, pairs, num_tokens)


def sum_in_token_order(pair_rows: torch.Tensor, pairs: ExpertSortedPairs, num_tokens: int) -> torch.Tensor:
    """Deterministic per-token sum: undo the sort, view as (T, K, D) and reduce over K (fp32 accumulation)."""
    inverse = torch.empty_like(pairs.order)
    inverse[pairs.order] = torch.arange(pairs.order.numel(), device=pairs.order.device)
    return pair_rows.index_select(0, inverse).view(num_tokens, -1, pair_rows.shape[1]).sum(dim=1)
