"""R, D and S on each TP rank's token rows when expert parallelism shares the tokens over a TP group
(`TokenSlicedAllToAll`, the all-to-all of `PerftExpertParallel`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers.distributed.expert_parallel import AllToAllEP

from ..terms import AdapterTensors, add_term
from .tensor_parallel import is_block_input_unchanged, warn_fallback_once

TOKEN_ROWS = "R, D and S on each TP rank's token rows under TP with EP (ep_implementation='perft')"
TOKEN_ROW_DETAILS = {
    "__call__": ("self._dispatch_tokens(", "self._combine_tokens("),
    "_dispatch_tokens": ("if self.tp_mesh.size() > 1:", ".redistribute(self.tp_mesh, [Shard(0)])"),
    "_combine_tokens": ("if self.tp_mesh.size() == 1:", "[Shard(0)]", ".full_tensor()"),
}
"""What `TokenSlicedAllToAll` relies on in Transformers' private `AllToAllEP`, as code each method contains: the
call dispatches and combines through these two methods, which read the TP mesh only for its size and otherwise cut
the rows (``Replicate -> Shard(0)``) and all-gather them back (``Shard(0) -> Replicate``) as PERFT does around them.
A textual check on purpose: any rewrite of those lines needs a new look before PERFT relies on them again."""


def token_rows_available() -> bool:
    """Whether the installed `AllToAllEP` is as `TokenSlicedAllToAll` relies on; if not, warn once per process that
    R, D and S stay replicated."""
    missing = missing_token_row_details()
    if missing:
        warn_fallback_once(
            TOKEN_ROWS,
            "; ".join(missing),
            "R, D and S stay replicated, every TP rank computing them on all the tokens its TP group shares",
        )
    return not missing


def missing_token_row_details() -> list[str]:
    """The details of `TOKEN_ROW_DETAILS` that the installed `AllToAllEP` does not have (empty: all there)."""
    missing = []
    for method, fragments in TOKEN_ROW_DETAILS.items():
        function = getattr(AllToAllEP, method, None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        missing += [f"AllToAllEP.{method} containing {fragment!r}" for fragment in fragments if fragment not in source]
    return missing


class TokenSliceTerms:
    """The R, D and S adapters a block offers, for one forward, to its experts' `TokenSlicedAllToAll`, which adds
    them on this rank's token rows; the block adds those it did not take (`left`) itself, on all rows."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.names: list[str] = []
        self._experts_input: torch.Tensor | None = None
        self._version = 0

    def offer(self, names: list[str], experts_input: torch.Tensor) -> None:
        """``experts_input`` is what the block passes its base layer: the adapters' input, unless changed on the way."""
        self.names, self._experts_input, self._version = names, experts_input, experts_input._version

    def take(self, hidden_states: torch.Tensor) -> list[str]:
        """The offered adapters, if ``hidden_states`` (the experts' input) is the offered input, flattened and not
        changed in place since (Mixtral's router jitter scales it in training: the block then adds them itself)."""
        offered = self._experts_input
        if not self.names or offered is None or not is_block_input_unchanged(hidden_states, offered, self._version):
            return []
        names, self.names = self.names, []
        return names

    def left(self) -> list[str]:
        """The offered adapters the dispatch did not take; forgets the offer."""
        names, self.names, self._experts_input = self.names, [], None
        return names

    def add(
        self,
        output: torch.Tensor,
        names: list[str],
        hidden_states: torch.Tensor,
        input_rows: torch.Tensor,
        rows: Callable[[torch.Tensor], torch.Tensor],
        tp_size: int,
    ) -> torch.Tensor:
        """Add each adapter's term on ``input_rows``, this rank's rows of ``hidden_states`` (the very tensor the
        experts got, so that its gradient joins theirs before the backward all-gather), to ``output``.

        PERFT-R routes all tokens (its routing record and aux loss are one process's) and keeps its weights' rows;
        their gradient rows are all-gathered by ``rows``' backward, so the router's gradient is whole on every
        rank. The adapter experts' gradients cover this rank's rows only: scaled by ``tp_size`` they are the
        group's sum once `replicate_adapter` has averaged them over all ranks."""
        block = self.block
        for name in names:
            lora_A, lora_B, router = block.adapter_tensors(name)
            scaled = AdapterTensors(
                _ScaledGradient.apply(lora_A, tp_size), _ScaledGradient.apply(lora_B, tp_size), router
            )
            delta = block.adapter_term(
                name,
                input_rows,
                tensors=scaled,
                router_input=hidden_states,
                local_routing=lambda index, weight: (rows(index), rows(weight)),
            )
            output = add_term(output, delta, block.perft_configs[name].scaling)
        return output


class _ScaledGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: int) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gradient * ctx.scale, None


class _UnsplitRows:
    """Stands in for the TP mesh while Transformers' `AllToAllEP` runs on rows already split: it reads only the
    mesh's size there, and with 1 neither slices nor gathers."""

    @staticmethod
    def size() -> int:
        return 1


class TokenSlicedAllToAll(AllToAllEP):
    """Transformers' `AllToAllEP`, where the block's offered R, D and S adapters (`TokenSliceTerms`) are added on
    this rank's rows of the tokens its TP group shares, between the combine and the all-gather of the rows.

    `AllToAllEP` gives each rank of a TP group a disjoint slice of the shared tokens (``Replicate -> Shard(0)``, a
    local chunk whose backward all-gathers the rows' gradients) and all-gathers the combined rows back
    (``Shard(0) -> Replicate``). Here that slicing and that gather are done around Transformers' own call (on the
    rows, with the TP size read as 1), so the adapters' terms ride on the forward all-gather and their input
    gradient on the backward one: each rank computes the adapter experts on ``1 / tp`` of the tokens, with no
    collective of its own but the all-gather of PERFT-R's (tokens x top-k) weight gradients."""

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.rows_mesh = tp_mesh
        self.token_slice_terms: TokenSliceTerms | None = None  # set by offer_token_slices

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        terms = self.token_slice_terms
        names = terms.take(hidden_states) if terms is not None and self.rows_mesh.size() > 1 else []
        if not names:
            return super().__call__(hidden_states, top_k_index, top_k_weights)
        rows = [self._own_rows(tensor) for tensor in (hidden_states, top_k_index, top_k_weights)]
        self.tp_mesh = _UnsplitRows()
        try:
            output = super().__call__(*rows)
        finally:
            self.tp_mesh = self.rows_mesh
        output = terms.add(output, names, hidden_states, rows[0], self._own_rows, self.rows_mesh.size())
        hidden = output.shape[-1]
        whole = DTensor.from_local(
            output.contiguous(), self.rows_mesh, [Shard(0)], shape=(hidden_states.shape[0], hidden), stride=(hidden, 1)
        )
        return whole.full_tensor()

    def _own_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor its TP group shares, cut as `AllToAllEP` cuts them."""
        shared = DTensor.from_local(tensor, self.rows_mesh, [Replicate()], run_check=False)
        return shared.redistribute(self.rows_mesh, [Shard(0)]).to_local()
