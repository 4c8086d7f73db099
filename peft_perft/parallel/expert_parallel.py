"""PERFT-E sharded like the experts under expert parallelism.

`PerftExpertParallel`, registered with Transformers as ``ep_implementation="perft"``, computes each adapter
expert's term on the rank owning the base expert, inside the experts' own token dispatch; with tensor parallelism
beside EP its all-to-all (`TokenSlicedAllToAll`) also computes R, D and S on each TP rank's rows of the shared
tokens instead of on all of them on every rank.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from transformers.distributed.expert_parallel import AutoEP, EPImplementation, EPImplementationInterface

from ..terms import AdapterTensors, add_term, no_record
from .token_slices import TokenSlicedAllToAll, TokenSliceTerms, token_rows_available

EXPERT_PARALLEL_NAME = "perft"
OWNER = "expert_parallel"
"""The block's ``term_owners`` entry of a PERFT-E adapter sharded here: its term is added inside the dispatch."""
_EXPERT_PARALLEL_ATTRIBUTE = "perft_expert_parallel"


class PerftExpertParallel(EPImplementation):
    """``DistributedConfig(ep_implementation="perft")``: Transformers' default expert dispatch ("auto"), with the
    term of each PERFT-E adapter expert computed by the rank that owns the matching base expert, on the tokens the
    dispatch brought it.

    Each rank then holds only the adapter experts of its local base experts (``perft_A`` / ``perft_B`` are DTensors
    sharded on the expert dimension over the EP mesh, as the base experts are), and the routing weights, the
    token exchange and the combine are the base experts' own. Without this implementation PERFT-E still runs under
    EP, replicated: every rank holds and computes every adapter expert on its own tokens.

    Its all-to-all dispatch is `TokenSlicedAllToAll`, which under TP also adds the block's R, D and S adapters on
    this rank's token rows.
    """

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.dispatch = AutoEP(experts, ep_mesh, tp_mesh)
        self.dispatch.all_to_all = TokenSlicedAllToAll(experts, ep_mesh, tp_mesh)
        for implementation in (self.dispatch.all_to_all, self.dispatch.all_reduce):
            if implementation is not None:
                implementation.experts_forward = self._experts_with_adapters
        self.block: nn.Module | None = None  # the PerftMoeBlock whose E adapters run here, set by shard_routed_adapter
        object.__setattr__(experts, _EXPERT_PARALLEL_ATTRIBUTE, self)

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.dispatch(hidden_states, top_k_index, top_k_weights)

    def _experts_with_adapters(
        self, tokens: torch.Tensor, local_index: torch.Tensor, weights: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """The local base experts plus the local adapter experts of the block's active E adapters.

        ``local_index`` holds local expert ids; ids past the local count are routes to other ranks (AllReduceEP
        marks them so, with weight 0) and add nothing."""
        output = self.experts_forward(tokens, local_index, weights, **kwargs)
        block = self.block
        names = [] if block is None else block.routed_adapters_owned_by(OWNER)
        if not names:
            return output
        off_rank = local_index >= self.num_local_experts
        routing = (local_index.masked_fill(off_rank, 0), weights.masked_fill(off_rank, 0.0))
        for name in names:
            lora_A, lora_B, _ = block.adapter_tensors(name)
            local = AdapterTensors(lora_A.to_local(), lora_B.to_local())
            # The routing record is the block's (global expert ids), kept by its experts hook.
            delta = block.adapter_term(name, tokens, tensors=local, routing=routing, record=no_record)
            output = add_term(output, delta, block.perft_configs[name].scaling)
        return output


def install_expert_parallel() -> None:
    """Register `PerftExpertParallel` with Transformers under the name ``"perft"`` (idempotent)."""
    EPImplementationInterface.register(EXPERT_PARALLEL_NAME, PerftExpertParallel)


def shard_routed_adapter(block: nn.Module, adapter_name: str) -> bool:
    """Shard a new PERFT-E adapter's tensors like the block's base experts when they are dispatched by
    `PerftExpertParallel`; True when it did (the adapter's term is then computed inside the dispatch)."""
    experts = block.spec.experts_module(block.base_layer)
    implementation = getattr(experts, _EXPERT_PARALLEL_ATTRIBUTE, None)
    if implementation is None:
        return False
    distributed = getattr(getattr(experts, "config", None), "distributed_config", None)
    if distributed is None or distributed.efsdp_size > 1 or distributed.dp_replicate_size > 1:
        sizes = "" if distributed is None else _layout_sizes(distributed)
        raise NotImplementedError(
            f"PERFT-E sharded over expert parallelism (ep_implementation={EXPERT_PARALLEL_NAME!r}) needs every "
            f"expert on exactly one rank: ep_size == fsdp_size * tp_size and dp_replicate_size == 1 (got {sizes}). "
            f"Use such a layout, or load without ep_implementation={EXPERT_PARALLEL_NAME!r} to run PERFT-E "
            f"replicated."
        )
    for tensors in (block.perft_A, block.perft_B):
        full = tensors[adapter_name]
        # Every rank built the full tensor; rank 0's values are distributed, so all ranks agree whatever their seed.
        sharded = nn.Parameter(
            distribute_tensor(full.data, implementation.ep_mesh, [Shard(0)]), requires_grad=full.requires_grad
        )
        sharded.register_hook(functools.partial(_mean_over_batches, dp_size=distributed.dp_size))
        tensors[adapter_name] = sharded
    block.term_owners[adapter_name] = OWNER
    implementation.block = block
    return True


def _layout_sizes(distributed: Any) -> str:
    names = ("ep_size", "fsdp_size", "tp_size", "efsdp_size", "dp_replicate_size")
    return ", ".join(f"{name}={getattr(distributed, name)}" for name in names)


def _mean_over_batches(gradient: torch.Tensor, dp_size: int) -> torch.Tensor:
    """A sharded adapter expert's gradient, scaled as Transformers scales the base experts' (see its FSDP setup).

    The all-to-all brings the expert the tokens of every batch of the EP group, so its gradient is the sum over
    the ``dp_size`` batches; divided by ``dp_size`` it is the gradient of the mean loss, as in one process."""
    return gradient / dp_size if dp_size > 1 else gradient


def offer_token_slices(block: nn.Module) -> None:
    """Let the block's R, D and S adapters be computed on this rank's token rows when its experts are dispatched by
    `PerftExpertParallel` over a TP group of more than one rank (see `TokenSlicedAllToAll`); idempotent."""
    if block.token_slice_terms is not None or block.spec.experts_name is None:
        return
    implementation = getattr(block.spec.experts_module(block.base_layer), _EXPERT_PARALLEL_ATTRIBUTE, None)
    if implementation is None or implementation.tp_mesh.size() == 1 or not token_rows_available():
        return
    block.token_slice_terms = implementation.dispatch.all_to_all.token_slice_terms = TokenSliceTerms(block)
