"""PERFT-E inside the base experts' own dispatch: one sort, one gather and one weighted sum for both.

Transformers' ``grouped_mm`` experts implementation sorts the (token, expert) pairs by expert, gathers the token
rows, runs each expert's projections as grouped GEMMs, weights every pair by its routing weight and sums the K
pairs of each token. A PERFT-E adapter expert ``dE_e(h) = B_e act(A_e h)`` sees exactly the same pairs, so its
term is two more rank-r grouped GEMMs on the rows already gathered, added to the expert output before the
routing weight:

    out[t] = sum_k w[t, k] * (E_e(h_t) + scaling * dE_e(h_t)),  e = index[t, k]

That is PERFT-E at its FLOP floor: no second sort, gather, un-permute or weighted sum.
Under ``torch.compile`` in any dtype but bf16, where Transformers' own grouped_mm would call its fallback operator
(whose backward also computes a gradient for each frozen expert weight), the frozen projections run through torch's
grouped kernel too, computing only the gradients that are needed.

``install`` replaces the forward of one experts module by a wrapper that, per call, asks its PERFT block which
E adapters are pending. Where the user's chosen implementation (read from the config at every call, so
``set_experts_implementation`` keeps working) is ``grouped_mm`` and nothing else stands in the way (expert
parallelism, a decode step on CPU), eager or under ``torch.compile``, it computes base and adapters together and
marks the adapters done; otherwise it calls the chosen implementation (or the module's own forward) unchanged and
lets the block add the pending adapters through a dispatch backend. The block's forward hook stays as the fallback for a
module whose forward cannot be replaced (one already wrapped at instance level) and adds only what is still pending.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations import moe as transformers_moe

from . import as_dtype
from .gather import decode_sized
from .grouped import GroupedLinear, aligned, kernel_runs
from .sorting import group_ends, pad_rank

FUSED_IMPLEMENTATION = "grouped_mm"
"""The Transformers experts implementation whose permutation PERFT-E shares."""

_ALIGN_BYTES = 16


@dataclass(frozen=True)
class AdapterTerm:
    """One pending PERFT-E adapter for an experts call: its stacked ``A`` (which says whether the kernel fits), its
    scaling, and its term (the block's ``adapter_term``, `terms.adapter_delta` with the adapter's tensors, dropout
    and routing record), which this path calls with the routing and its own computation of the routed experts.
    ``expert_slots`` (selective PERFT-E) maps each base expert to its row of ``A`` and ``B``, or past the last row
    where it has none."""

    lora_A: torch.Tensor
    scaling: float
    delta: Callable[..., torch.Tensor]
    expert_slots: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """The base experts the term covers (selective PERFT-E stores fewer adapter experts)."""
        return self.lora_A.shape[0] if self.expert_slots is None else self.expert_slots.shape[0]


PendingTerms = Callable[[], Sequence[AdapterTerm]]
"""The block's callback: the E adapters still to add in this call (empty outside the block's forward)."""
MarkDone = Callable[[], None]
"""The block's callback once they were added here (their terms recorded the routing): clear the queue."""
AddPending = Callable[[nn.Module, tuple, dict, torch.Tensor], torch.Tensor | None]
"""The block's callback after any other experts call: add the pending adapters to the output (None: nothing to add)."""


def install(experts: nn.Module, pending: PendingTerms, mark_done: MarkDone, add_pending: AddPending) -> bool:
    """Replace ``experts.forward`` by ``ForwardWithAdapters``; False if the module already has an instance-level
    forward (accelerate's hooks, another wrapper), which is then left alone and the block's hook does the work."""
    if "forward" in vars(experts):
        return False
    experts.forward = ForwardWithAdapters(experts, pending, mark_done, add_pending)
    return True


class ForwardWithAdapters:
    """An experts module's forward that adds its block's pending E adapters: inside the grouped_mm dispatch where
    it can, else right after the user's chosen implementation (in the module's forward rather than in a forward
    hook, which ``torch.compile``'s inductor backend was seen to get wrong with torch 2.13).

    A callable object rather than a closure, so that ``copy.deepcopy`` of a model rebinds it to the copies."""

    def __init__(self, experts: nn.Module, pending: PendingTerms, mark_done: MarkDone, add_pending: AddPending):
        self.experts, self.pending, self.mark_done, self.add_pending = experts, pending, mark_done, add_pending
        # decided once: a module's class does not change, and the check walks its class hierarchy (on every call it
        # cost host time in eager decode steps, and a dozen more guards per block in compiled ones)
        self.uses_experts_interface = _uses_experts_interface(experts)

    def __call__(self, *args, **kwargs):
        experts = self.experts
        fusable = self.uses_experts_interface and len(args) == 3 and not kwargs
        if fusable and _fusable_call(experts, args[0], args[1]):
            terms = self.pending()
            if terms and _can_fuse_terms(experts, args[0], terms):
                output = grouped_experts_with_adapters(experts, *args, terms)
                self.mark_done()
                return output
        output = type(experts).forward(experts, *args, **kwargs)
        added = self.add_pending(experts, args, kwargs, output)
        return output if added is None else added


def uninstall(experts: nn.Module) -> None:
    """Give the experts module its class's forward back."""
    if isinstance(vars(experts).get("forward"), ForwardWithAdapters):
        del experts.forward


def _uses_experts_interface(experts: nn.Module) -> bool:
    """Whether the module's forward is the one Transformers' ``use_experts_implementation`` installed.

    A subclass that overrides that forward (Ergo's experts, which run the projections once per route and apply a
    per-expert norm before summing, in Transformers 5.25) computes something else around the implementation:
    rebuilding grouped_mm here would compute the decorated class's output, not the module's."""
    if not (hasattr(experts, "has_gate") and hasattr(getattr(experts, "config", None), "_experts_implementation")):
        return False
    forward = type(experts).forward
    defining_class = next(klass for klass in type(experts).__mro__ if "forward" in vars(klass))
    return hasattr(forward, "__wrapped__") and hasattr(defining_class.__init__, "__wrapped__")


def _fusable_call(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """For experts whose forward is Transformers' experts interface: the chosen implementation is grouped_mm, on one
    device's full expert set, in the layout grouped_mm_experts_forward reads (2-D hidden states and routing), and the
    call is not a CPU decode step. Eager or compiled: every shape on this path is static (see ``grouped``).

    On CPU, torch's grouped_mm runs one GEMM per group, empty groups included (64 ``mm`` calls per grouped GEMM
    for OLMoE's 64 experts, under torch.profiler with torch 2.13): on a decode-sized call the adapter's two grouped
    GEMMs then cost more than the ``gather`` backend's few small kernels after the experts call (BENCHMARKS.md)."""
    if experts.config._experts_implementation != FUSED_IMPLEMENTATION or experts._is_expert_parallel:
        return False
    if hidden.dim() != 2 or top_k_index.dim() != 2:
        return False
    return not (hidden.device.type == "cpu" and decode_sized(experts.num_experts, top_k_index))


def _can_fuse_terms(experts: nn.Module, hidden: torch.Tensor, terms: Sequence[AdapterTerm]) -> bool:
    """The adapters fit grouped_mm: an aligned hidden size, a kernel for their dtype, one slot per base expert."""
    if hidden.shape[1] * terms[0].lora_A.element_size() % _ALIGN_BYTES:
        return False
    if not kernel_runs(hidden.device.type, terms[0].lora_A.dtype):
        return False
    return all(term.num_experts == experts.num_experts for term in terms)


def grouped_experts_with_adapters(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    terms: Sequence[AdapterTerm],
) -> torch.Tensor:
    """The grouped_mm experts forward with each adapter's term added per pair, before the routing weight."""
    num_tokens, top_k = top_k_index.shape
    with torch.no_grad():
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        offsets, empty = group_ends(expert_ids, experts.num_experts)
    token_of_pair = order // top_k
    rows = hidden_states.index_select(0, token_of_pair)
    pair_output = _base_pairs(experts, rows, expert_ids, offsets, empty)
    sorted_pairs = _SortedPairs(hidden_states, rows, token_of_pair, offsets, empty)
    for term in terms:
        pairs = functools.partial(sorted_pairs.adapter_pairs, scaling=term.scaling, expert_slots=term.expert_slots)
        delta = term.delta(hidden_states, routing=(top_k_index, top_k_weights), experts=pairs)
        pair_output = pair_output + as_dtype(delta, pair_output.dtype)
    pair_weight = top_k_weights.reshape(-1).index_select(0, order)
    weighted = pair_output * pair_weight.unsqueeze(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    per_token = weighted.index_select(0, inverse).view(num_tokens, top_k, -1).sum(dim=1)
    return per_token.to(hidden_states.dtype)


def _base_pairs(
    experts: nn.Module, rows: torch.Tensor, expert_ids: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor
) -> torch.Tensor:
    """The frozen experts' output per sorted pair, with Transformers' gate and post-norm around the grouped linears."""
    up_weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    up_bias = None
    if experts.has_bias:
        up_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[expert_ids]
    hidden = _grouped_linear(experts, rows, up_weight, offsets, empty, up_bias)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    down_bias = experts.down_proj_bias[expert_ids] if experts.has_bias else None
    output = _grouped_linear(experts, hidden, experts.down_proj, offsets, empty, down_bias)
    return experts.post_expert_norm(output) if experts.has_post_expert_norm else output


def _grouped_linear(
    experts: nn.Module,
    rows: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    empty: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One grouped projection of the frozen experts: `lean_grouped_mm` where it applies, else Transformers' own."""
    output = lean_grouped_mm(rows, weight if experts.is_transposed else weight.transpose(1, 2), offsets, empty)
    if output is None:
        return transformers_moe._grouped_linear(rows, weight, offsets, bias=bias, is_transposed=experts.is_transposed)
    return output if bias is None else output + bias


def lean_grouped_mm(
    rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Rows sorted by expert times their expert's weight (N, in, out), through ``GroupedLinear``, which computes only
    the gradients autograd asks for, where Transformers would compile its fallback operator instead (any dtype but
    bf16), whose backward computes and zero-fills a gradient for every expert weight, frozen or not (Transformers
    5.25); None where Transformers' own grouped product is to run. ``empty`` (N, 1, 1) is derived from the group ends
    where not given."""
    fallback = torch.compiler.is_compiling() and not transformers_moe._can_use_grouped_mm(rows, weight, offsets)
    if not (fallback and kernel_runs(rows.device.type, weight.dtype)):
        return None
    if empty is None:
        empty = torch.diff(offsets, prepend=offsets.new_zeros(1)).eq(0).view(-1, 1, 1)
    return GroupedLinear.apply(rows.to(weight.dtype), weight.transpose(1, 2), offsets, empty)


@dataclass(frozen=True)
class _SortedPairs:
    """The (token, expert) pairs of one experts call, sorted by expert: the token rows the experts gathered
    (``rows``, from ``hidden_states``), each pair's token, and the grouped GEMMs' group ends and empty groups."""

    hidden_states: torch.Tensor
    rows: torch.Tensor
    token_of_pair: torch.Tensor
    offsets: torch.Tensor
    empty: torch.Tensor

    def adapter_pairs(
        self,
        adapter_input: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        scaling: float,
        expert_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``scaling * B_e act(A_e h)`` per sorted pair as two grouped GEMMs, the rank padded for the kernel: the
        routed experts of `terms.adapter_delta` on the pairs already sorted (the routing is the base's, and its
        weights multiply base and adapter together afterwards). The scaling multiplies the r-wide bottleneck, not
        the D-wide output, so neither pass multiplies T*K D-wide rows. Selective PERFT-E's rows are laid out per base
        expert (``expert_slots``), zero where an expert has none, as the pairs are grouped by base expert."""
        # Without dropout or a dtype change the adapter reads the experts' own gathered rows: no second gather of
        # T*K D-wide rows, nor its scatter back in the backward.
        same_rows = adapter_input is self.hidden_states
        adapter_rows = self.rows if same_rows else adapter_input.index_select(0, self.token_of_pair)
        if expert_slots is not None:
            lora_A, lora_B = per_base_expert(lora_A, expert_slots), per_base_expert(lora_B, expert_slots)
        lora_A, lora_B = pad_rank(lora_A, lora_B, _ALIGN_BYTES // lora_A.element_size())
        down = GroupedLinear.apply(adapter_rows, aligned(lora_A), self.offsets, self.empty)
        if activation is not None:
            down = activation(down)
        if scaling != 1:
            down = down * scaling
        return GroupedLinear.apply(down, aligned(lora_B), self.offsets, self.empty)


def per_base_expert(stacked: torch.Tensor, expert_slots: torch.Tensor) -> torch.Tensor:
    """Selective PERFT-E's stacked experts (S, ...) as one row per base expert (N, ...): a zero row for an expert
    without an adapter expert (slot S), so that it adds exactly nothing; differentiable, the gradient reaching only
    the S stored rows. A transient of the full E's size, for the kernel's groups (nothing stored)."""
    zero_row = stacked.new_zeros(1, *stacked.shape[1:])
    return torch.cat([stacked, zero_row]).index_select(0, expert_slots)
