"""PERFT-E sharded like the experts under expert parallelism.

`PerftExpertParallel`, registered with Transformers as ``ep_implementation="perft"``, computes each adapter
expert's term on the rank owning the base expert, inside the experts' own token dispatch; with tensor parallelism
beside EP, R, D and S are computed on each TP rank's rows of the shared tokens instead of on all of them on every
rank (`token_slices.TokenRowTerms`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from transformers.distributed.expert_parallel import AutoEP, EPImplementation, EPImplementationInterface

from ..architectures import WHOLE_SHAPE_ATTRIBUTE
from ..terms import AdapterTensors, add_term, no_record
from . import token_slices

EXPERT_PARALLEL_NAME = "perft"
OWNER = "expert_parallel"
"""The block's ``term_owners`` entry of a PERFT-E adapter sharded here: its term is added inside the dispatch."""
_EXPERT_PARALLEL_ATTRIBUTE = "perft_expert_parallel"
SELECTED_ROWS_ATTRIBUTE = "perft_selected_rows"
"""Set on the plain tensor holding one EP rank's rows of a selective PERFT-E adapter (its `SelectedRows`)."""


class SelectedExpertsImbalanceWarning(UserWarning):
    """Selective PERFT-E under expert parallelism: the EP ranks hold unequal numbers of adapter experts."""


@dataclass(frozen=True)
class SelectedRows:
    """Which rows of a selective PERFT-E tensor (one per selected expert, in expert order) this EP rank holds: its
    local base experts' selected ones, which are consecutive; the ranks in order hold them all. ``local_slots`` maps
    each local base expert to its row here, or to the row count where it has none."""

    group: dist.ProcessGroup
    rows: list[int]
    local_slots: torch.Tensor


class PerftExpertParallel(EPImplementation):
    """``DistributedConfig(ep_implementation="perft")``: Transformers' default expert dispatch ("auto"), with the
    term of each PERFT-E adapter expert computed by the rank that owns the matching base expert, on the tokens the
    dispatch brought it.

    Each rank then holds only the adapter experts of its local base experts (``perft_A`` / ``perft_B`` are DTensors
    sharded on the expert dimension over the EP mesh, as the base experts are), and the routing weights, the
    token exchange and the combine are the base experts' own. Without this implementation PERFT-E still runs under
    EP, replicated: every rank holds and computes every adapter expert on its own tokens.
    """

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.dispatch = AutoEP(experts, ep_mesh, tp_mesh)
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
            local = AdapterTensors(_local(lora_A), _local(lora_B))
            if local.lora_A.shape[0] == 0:
                continue  # selective PERFT-E with none of this rank's experts selected
            # The routing record is the block's (global expert ids), kept by its experts hook.
            selected = getattr(lora_A, SELECTED_ROWS_ATTRIBUTE, None)
            slots = None if selected is None else selected.local_slots
            delta = block.adapter_term(
                name, tokens, tensors=local, routing=routing, record=no_record, expert_slots=slots
            )
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
    if block.selected_expert_slots(adapter_name) is not None:
        _keep_local_selected_experts(block, adapter_name, implementation, distributed.dp_size)
        return True
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


def _keep_local_selected_experts(
    block: nn.Module, adapter_name: str, implementation: PerftExpertParallel, dp_size: int
) -> None:
    """Selective PERFT-E under EP: keep, as plain tensors, the rows of this rank's selected local experts (rank 0's
    values, as for the full adapter), which the dispatch computes (`warn_uneven_selection` reports unequal ranks)."""
    slots = block.selected_expert_slots(adapter_name)
    num_local, rank = implementation.num_local_experts, implementation.ep_mesh.get_local_rank()
    selected_count = block.perft_A[adapter_name].shape[0]
    local_slots = slots[rank * num_local : (rank + 1) * num_local]
    held = local_slots < selected_count
    rows = local_slots[held]
    group = implementation.ep_mesh.get_group()
    rows_here = SelectedRows(
        group, rows.tolist(), torch.where(held, torch.cumsum(held, 0) - 1, torch.full_like(local_slots, len(rows)))
    )
    for tensors in (block.perft_A, block.perft_B):
        whole = tensors[adapter_name].data.clone()
        dist.broadcast(whole, group=group, group_src=0)
        local = nn.Parameter(whole[rows].clone(), requires_grad=tensors[adapter_name].requires_grad)
        local.register_hook(functools.partial(_mean_over_batches, dp_size=dp_size))
        setattr(local, SELECTED_ROWS_ATTRIBUTE, rows_here)
        setattr(local, WHOLE_SHAPE_ATTRIBUTE, whole.shape)
        tensors[adapter_name] = local
    block.term_owners[adapter_name] = OWNER
    implementation.block = block


def expert_parallel_balance(model: nn.Module, adapter_name: str = "default") -> dict[str, list[int]]:
    """Selective PERFT-E under EP: per MoE block, how many of the adapter's experts each EP rank holds (rank 0
    first), from the selection alone (no communication)."""
    balance = {}
    for module in model.modules():
        slots = getattr(module, "selected_expert_slots", lambda name: None)(adapter_name)
        implementation = None
        if slots is not None and module.spec.experts_name is not None:
            implementation = getattr(module.spec.experts_module(module.base_layer), _EXPERT_PARALLEL_ATTRIBUTE, None)
        if implementation is not None:
            selected_count = int(getattr(module.perft_A[adapter_name], WHOLE_SHAPE_ATTRIBUTE)[0])
            parts = slots.split(implementation.num_local_experts)
            balance[module.block_name] = [int((part < selected_count).sum()) for part in parts]
    return balance


def warn_uneven_selection(model: nn.Module, adapter_name: str) -> None:
    """One warning per selective PERFT-E adapter (not one per block) where the EP ranks hold unequal numbers of its
    adapter experts: the busiest rank sets the adapter's memory and time, which a per-block warning would bury on a
    deep model."""
    balance = expert_parallel_balance(model, adapter_name)
    uneven = {block: counts for block, counts in balance.items() if max(counts) != min(counts)}
    if not uneven:
        return
    block, counts = max(uneven.items(), key=lambda item: max(item[1]) - min(item[1]))
    warnings.warn(
        f"Selective PERFT-E adapter {adapter_name!r}: the {len(counts)} expert-parallel ranks hold unequal numbers of "
        f"its adapter experts in {len(uneven)} of {len(balance)} MoE blocks (most uneven: {block!r}, {counts} per "
        f"rank, rank 0 first), so the busiest rank sets the adapter's memory and time there. Selected experts "
        f"follow the data's routing; expert_parallel_balance(model) lists every block.",
        SelectedExpertsImbalanceWarning,
        stacklevel=2,
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an adapter tensor sharded over EP: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _layout_sizes(distributed: Any) -> str:
    names = ("ep_size", "fsdp_size", "tp_size", "efsdp_size", "dp_replicate_size")
    return ", ".join(f"{name}={getattr(distributed, name)}" for name in names)


def _mean_over_batches(gradient: torch.Tensor, dp_size: int) -> torch.Tensor:
    """A sharded adapter expert's gradient, scaled as Transformers scales the base experts' (see its FSDP setup).

    The all-to-all brings the expert the tokens of every batch of the EP group, so its gradient is the sum over
    the ``dp_size`` batches; divided by ``dp_size`` it is the gradient of the mean loss, as in one process."""
    return gradient / dp_size if dp_size > 1 else gradient


def split_over_token_rows(block: nn.Module, adapter_name: str) -> bool:
    """Compute a new R, D or S adapter on this rank's token rows (`token_slices.TokenRowTerms`) when the block's
    experts are dispatched by `PerftExpertParallel` over a TP group of more than one rank; True when it does."""
    if block.spec.experts_name is None:
        return False
    implementation = getattr(block.spec.experts_module(block.base_layer), _EXPERT_PARALLEL_ATTRIBUTE, None)
    if implementation is None or implementation.tp_mesh.size() == 1:
        return False
    block.term_owners[adapter_name] = token_slices.OWNER
    if block.split_terms is None:
        block.split_terms = token_slices.TokenRowTerms(block, implementation.tp_mesh)
    return True
