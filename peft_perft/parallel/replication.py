"""Replicated adapter tensors on a model Transformers sharded at load time: the same on every rank, gradients
averaged.

PERFT's tensors are created after Transformers applied FSDP (``fsdp_size``), so no engine manages them: their
gradients would never be averaged and each rank would train its own adapter. `replicate_adapter` broadcasts them
from rank 0 and averages their gradients over all ranks after every backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .expert_parallel import SELECTED_ROWS_ATTRIBUTE

# Transformers' Trainer registers its own gradient average for replicated parameters unless this flag is set.
TRAINER_HOOK_FLAG = "_replicated_grad_hook_registered"


def is_distributed() -> bool:
    """More than one process in the default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_config_of(model: nn.Module) -> Any:
    """The `DistributedConfig` Transformers sharded ``model`` with at load time, or None."""
    return getattr(getattr(model, "config", None), "distributed_config", None)


def replicate_adapter(model: nn.Module) -> None:
    """Make the trainable tensors no engine manages behave as under DDP: identical on every rank at the start
    (broadcast from rank 0) and with gradients averaged over all ranks after each backward.

    Only for a model sharded by Transformers at load time (DDP and FSDP2 applied afterwards manage the adapter
    themselves), called after PERFT injects an adapter. Averaging after every
    backward is also right under gradient accumulation (the average of already-averaged gradients plus new local
    ones is the average of both), so no sync window has to be known. Ranks of a tensor-parallel group see the same
    batch and compute the same gradients, so averaging over them changes nothing.
    """
    if not is_distributed() or distributed_config_of(model) is None:
        return
    refuse_unsupported_layout(model)
    for parameter in _unmanaged_trainable_parameters(model):
        with torch.no_grad():
            dist.broadcast(parameter.data, src=0)
        if not getattr(parameter, TRAINER_HOOK_FLAG, False):
            parameter.register_post_accumulate_grad_hook(_average_gradient)
            setattr(parameter, TRAINER_HOOK_FLAG, True)


def refuse_unsupported_layout(model: nn.Module) -> None:
    """Raise for a sharding PERFT cannot train correctly, instead of letting the ranks diverge."""
    config = distributed_config_of(model)
    if config is not None and getattr(config, "pp_size", 1) > 1:
        raise NotImplementedError(
            f"PERFT does not support pipeline parallelism (distributed_config.pp_size={config.pp_size}): each stage "
            f"holds only its own layers' adapter tensors, so they cannot be replicated and averaged over all ranks. "
            f"Load the model with tp_size / ep_size / fsdp_size only."
        )


def _average_gradient(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)


def _unmanaged_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that are plain tensors, in a fixed order (the same on every rank); not the rows of a
    selective PERFT-E adapter that expert parallelism spreads over the ranks (each rank holds other rows)."""
    return [
        p
        for p in model.parameters()
        if p.requires_grad and not isinstance(p, DTensor) and not hasattr(p, SELECTED_ROWS_ATTRIBUTE)
    ]


def local_shard(values: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """This rank's shard of whole ``values`` laid out as ``parameter`` (FSDP2's or a PERFT layout's, or this rank's
    rows of a selective PERFT-E adapter under EP), cut from rank 0's values so that every rank holds the same
    adapter (`PerftMoeBlock.reset_parameters` stores it)."""
    selected = getattr(parameter, SELECTED_ROWS_ATTRIBUTE, None)
    if selected is not None:
        values = values.contiguous()
        dist.broadcast(values, group=selected.group, group_src=0)
        return values[selected.rows]
    return distribute_tensor(values, parameter.device_mesh, parameter.placements).to_local()
