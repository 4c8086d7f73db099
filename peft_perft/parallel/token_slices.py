"""R, D and S on each TP rank's rows of the tokens its TP group shares, under TP with EP (`ep_implementation="perft"`).

There the ranks of a TP group share one batch and the experts are dispatched by EP, not split by TP. Each rank takes
a disjoint slice of the block's input rows (``Replicate -> Shard(0)``, a local chunk whose backward all-gathers the
rows' gradients), computes the whole adapter on its rows, and the rows' terms are all-gathered back
(``Shard(0) -> Replicate``) and added to the block's output, where one process adds them: each rank computes the
adapter experts on ``1 / tp`` of the tokens, at the cost of one all-gather of tokens x hidden values per block in
forward and one in backward (plus one of PERFT-R's tokens x top-k weight gradients). The terms are added to the
block's output, not to the experts' inside the dispatch, because many blocks scale or normalise the experts' output
before returning it (Beam, MiniMax-M3-VL, Cohere2-MoE).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..terms import AdapterTensors, scaled_sum

OWNER = "token_rows"
"""The block's ``term_owners`` entry of an R, D or S adapter computed on token rows: `TokenRowTerms` adds it."""


class TokenRowTerms:
    """The R, D and S terms of a block's token-row adapters, called by the block where one process adds their whole
    terms: each adapter's term on this rank's rows, the rows all-gathered, whole on every rank.

    PERFT-R routes all tokens (its routing record and aux loss are one process's) and keeps its weights' rows; their
    gradient rows are all-gathered in backward, so the router's gradient is whole on every rank. The adapter
    experts' gradients cover this rank's rows only: scaled by the TP size they are the group's sum once
    `replicate_adapter` has averaged them over all ranks.

    A callable object rather than a closure, so that ``copy.deepcopy`` of a model rebinds it to the copies."""

    def __init__(self, block: nn.Module, mesh: DeviceMesh) -> None:
        self.block, self.mesh = block, mesh

    def __call__(self, names: list[str], hidden_states: torch.Tensor) -> torch.Tensor:
        """The scaled sum of the named adapters' terms on the block's input, (T, D) whole on every rank."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        rows = self._own_rows(tokens)
        tp_size = self.mesh.size()
        terms = []
        for name in names:
            lora_A, lora_B, router = self.block.adapter_tensors(name)
            scaled = AdapterTensors(
                _ScaledGradient.apply(lora_A, tp_size), _ScaledGradient.apply(lora_B, tp_size), router
            )
            term = self.block.adapter_term(
                name, rows, tensors=scaled, router_input=tokens, local_routing=self._own_routing_rows
            )
            terms.append((term, self.block.perft_configs[name].scaling))
        total = scaled_sum(terms)
        whole = DTensor.from_local(
            total.contiguous(), self.mesh, [Shard(0)], shape=tokens.shape, stride=(tokens.shape[1], 1)
        )
        return whole.full_tensor()

    def _own_routing_rows(self, index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._own_rows(index), self._own_rows(weight)

    def _own_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor its TP group shares (a local chunk, whose backward all-gathers the rows)."""
        shared = DTensor.from_local(tensor, self.mesh, [Replicate()], run_check=False)
        return shared.redistribute(self.mesh, [Shard(0)]).to_local()


class _ScaledGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: int) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gradient * ctx.scale, None
