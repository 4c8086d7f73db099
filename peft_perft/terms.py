"""One PERFT adapter's term, written once: every path that adds an adapter calls `adapter_delta`.

The one-process block, the tensor-parallel split, expert parallelism, the token rows under TP with EP and the
experts' in-dispatch path differ only in what they hand it: this rank's slices of ``A`` / ``B``, the rows of the
routing it keeps with their gradient reduction (``local_routing``), where the routing comes from, and (in the
experts' own dispatch) how the routed experts are computed. Routing, top-k, dropout and the dtype casts are here
alone; the scaling is applied where the term is added (`add_term`), which saves a kernel per block and token (the
in-dispatch path scales the bottleneck of its own routed computation instead).

Every path reaches it through the block's ``adapter_term``, which calls it as ``terms.adapter_delta`` (an attribute
of this module, not a name imported from it), so a test that replaces it sees every path change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import PerftConfig
from .dispatch import RoutedFn, add_scaled, always_on_experts, as_dtype, routed_experts

Routing = tuple[torch.Tensor, torch.Tensor]
"""Expert indices and weights (T, K)."""
LocalRouting = Callable[[torch.Tensor, torch.Tensor], Routing]
"""Maps the router's (indices, weights) to what this rank's share of the experts uses (rows, reduced gradients)."""
Replay = Callable[[torch.Tensor, Routing], Routing]
"""Given PERFT-R's router logits (T, N) fp32 and the top-k it chose, the routing to use instead (routing replay)."""


@dataclass
class RoutingRecord:
    """The routing an adapted block used in its last forward: what the aux loss and the monitor read.

    ``expert_index`` and ``expert_weight`` (T, K) are the experts each token went to; ``router_logits`` (T, N) are
    PERFT-R's router outputs (None for E, whose base router is frozen).
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    router_logits: torch.Tensor | None = None

    @property
    def router_probs(self) -> torch.Tensor | None:
        """PERFT-R's full softmax (T, N) in fp32, computed when read (by the aux loss), not on every decode step."""
        if self.router_logits is None:
            return None
        return torch.softmax(self.router_logits, dim=-1, dtype=torch.float32)


Record = Callable[[RoutingRecord], None]
"""Where a term leaves the routing it used (the block's ``routing_records``), or nowhere."""


class AdapterTensors(NamedTuple):
    """The tensors one adapter term reads: stacked experts ``A`` (N, r, D) and ``B`` (N, D, r), whole or this
    rank's slice, and PERFT-R's router (N, D)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    router: torch.Tensor | None = None


def adapter_delta(
    config: PerftConfig,
    tensors: AdapterTensors,
    adapter_input: torch.Tensor,
    *,
    dropout: Callable[[torch.Tensor], torch.Tensor],
    record: Record,
    router_input: torch.Tensor | None = None,
    routing: Routing | None = None,
    local_routing: LocalRouting | None = None,
    experts: RoutedFn | None = None,
    replay: Replay | None = None,
    expert_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adapter's unscaled term on ``adapter_input`` (T, D), in the adapter's dtype.

    R routes ``router_input`` (``adapter_input`` if None) with its own router and records that routing; E takes
    ``routing`` (the base model's, which the block records) as given; D and S use every expert. ``experts``
    computes the routed experts (the configured dispatch backend if None); ``replay``, where given, decides R's
    top-k from its router logits in place of the router's own choice. ``expert_slots`` (selective PERFT-E) maps
    each expert of the routing to its row of ``A`` and ``B``, the row count for an expert without one."""
    lora_A, lora_B, router = tensors
    adapter_input = as_dtype(adapter_input, lora_A.dtype)
    expert_input = dropout(adapter_input)
    if not config.is_routed:
        return always_on_experts(expert_input, lora_A, lora_B, activation(config))
    if routing is None:
        router_input = adapter_input if router_input is None else as_dtype(router_input, lora_A.dtype)
        router_logits = as_dtype(router_product(router_input, router), torch.float32)
        expert_index, expert_weight = top_k_routing(router_logits, config)
        if replay is not None:
            expert_index, expert_weight = replay(router_logits, (expert_index, expert_weight))
        record(RoutingRecord(expert_index, expert_weight, router_logits=router_logits))
    else:
        expert_index, expert_weight = routing
        record(RoutingRecord(detached(expert_index), detached(expert_weight)))
    expert_weight = as_dtype(expert_weight, lora_A.dtype)
    if local_routing is not None:
        expert_index, expert_weight = local_routing(expert_index, expert_weight)
    if expert_slots is not None:
        expert_index, expert_weight = selected_routing(expert_index, expert_weight, expert_slots, lora_A.shape[0])
    if experts is None:
        return routed_experts(
            expert_input, lora_A, lora_B, expert_index, expert_weight, activation(config), config.dispatch_backend
        )
    return experts(expert_input, lora_A, lora_B, expert_index, expert_weight, activation(config))


def selected_routing(
    expert_index: torch.Tensor, expert_weight: torch.Tensor, expert_slots: torch.Tensor, rows: int
) -> Routing:
    """Selective PERFT-E's routing over its ``rows`` adapter experts: each pair's expert mapped to its row, and a
    pair whose expert has none (slot ``rows``) sent to row 0 with weight 0, so that it adds exactly nothing, in
    the output as in the gradients."""
    slots = expert_slots.index_select(0, expert_index.reshape(-1)).view_as(expert_index)
    unselected = slots >= rows
    return slots.masked_fill(unselected, 0), expert_weight.masked_fill(unselected, 0)


def add_term(output, delta: torch.Tensor, scaling: float):
    """``output + scaling * delta`` in the output's dtype and shape (``(B, S, D)``, or ``(T, D)`` as Llama 4 and
    the experts return it), on the hidden states where the block returns a tuple."""
    if isinstance(output, tuple):
        return (add_term(output[0], delta, scaling), *output[1:])
    return add_scaled(output, as_dtype(delta, output.dtype).view(output.shape), scaling)


def scaled_sum(terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum scaling * term`` over (term, scaling) pairs of one shape: the adapters a parallel layout computes
    together, summed before their one collective."""
    (first, first_scaling), *others = terms
    total = first * first_scaling
    for term, scaling in others:
        total = add_term(total, term, scaling)
    return total


def router_product(router_input: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """PERFT-R's router logits (T, N). Compiled for one token (a decode step), as a product and a sum, which
    Inductor generates as one loop fused with its neighbours instead of calling an external GEMM for an N x D
    matrix-vector product."""
    if torch.compiler.is_compiling() and router_input.shape[0] == 1:
        return (router * router_input).sum(dim=-1).unsqueeze(0)
    return F.linear(router_input, router)


def top_k_routing(router_logits: torch.Tensor, config: PerftConfig) -> Routing:
    """PERFT-R's (indices, weights) (T, K): the top-k experts by router probability, their probabilities
    renormalised to sum 1 (the softmax of their logits, as softmax is monotonic) or left as they are."""
    top_k = top_k_of if torch.compiler.is_compiling() and router_logits.shape[0] == 1 else torch.topk
    if config.normalize_top_k:
        top_logits, top_index = top_k(router_logits, config.resolved_top_k(), dim=-1)
        return top_index, torch.softmax(top_logits, dim=-1)
    top_weight, top_index = top_k(torch.softmax(router_logits, dim=-1), config.resolved_top_k(), dim=-1)
    return top_index, top_weight


def top_k_of(values: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` (largest first) as k rounds of max-and-mask, for a compiled decode step: Inductor has no
    generated code for ``topk`` and calls ATen's from its wrapper, while each round here is a small reduction it
    generates and fuses. Ties go to the lowest index. For finite values (router logits of finite weights and
    inputs): a chosen value is masked with -inf, so a row with fewer than k finite values could repeat an index."""
    remaining = values
    top_values, top_index = [], []
    for _ in range(k):
        value, index = remaining.max(dim=dim, keepdim=True)
        top_values.append(value)
        top_index.append(index)
        remaining = remaining.scatter(dim, index, float("-inf"))
    return torch.cat(top_values, dim=dim), torch.cat(top_index, dim=dim)


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor cut from autograd for the routing records; itself where autograd does not track it (a decode
    step), which saves an op per block."""
    return tensor.detach() if tensor.requires_grad else tensor


def activation(config: PerftConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The bottleneck's activation: SiLU for the parallel adapter, none for LoRA-shaped experts."""
    return F.silu if config.adapter_type == "parallel_adapter" else None


def no_record(record: RoutingRecord) -> None:
    """For a term whose routing the block records elsewhere (E split over ranks: the block's experts hook)."""
