"""Saving and loading an adapter on a sharded model: only the adapter's tensors are gathered, on every rank.

peft's `get_peft_model_state_dict` gathers the *whole* model state dict (every base weight, as a collective
``DTensor.full_tensor()`` per tensor) before keeping the adapter keys. That does not fit at DeepSeek-V3 scale, and
since the Trainer calls ``save_pretrained`` with ``is_main_process`` false on the other ranks, any extra gather done
only on the main process (the model card used to do one) leaves one rank waiting in a collective the others never
join. `saving_gathered_adapter` (installed by `peft_perft.patches`) makes `PeftModel.save_pretrained` gather only the
adapter's tensors, on every rank, in one fixed order, and hand peft that small state dict;
`distribute_adapter_state_dict` lays a loaded one out as the model's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..loading import ADAPTER_KEY_MARKERS
from .expert_parallel import SELECTED_ROWS_ATTRIBUTE
from .replication import is_distributed

MODULES_TO_SAVE_MARKER = ".modules_to_save."


def gathered_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PERFT's and any ``modules_to_save``), whole and on CPU, keyed as in ``state_dict()``.

    Sharded tensors are gathered with one collective each, in ``state_dict()`` order, so every rank must call this;
    base weights are neither gathered nor copied.
    """
    gathered = {}
    with _zero3_gathered(model):
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not _is_adapter_key(key):
                continue
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            elif hasattr(tensor, SELECTED_ROWS_ATTRIBUTE):
                tensor = _all_selected_rows(tensor)
            # A copy, not a view of the live parameter: the optimiser must not change a state dict being saved, and
            # a ZeRO-3 parameter's gathered data is freed when the context ends.
            gathered[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return gathered


@contextlib.contextmanager
def _zero3_gathered(model: nn.Module) -> Iterator[None]:
    """Whole data, on every rank, in the adapter's DeepSpeed ZeRO-3 parameters for the time of the context (one
    collective, entered only once every rank has come to it); nothing to do on other models."""
    partitioned = [p for name, p in model.named_parameters() if _is_adapter_key(name) and is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with _all_ranks_checked_in(), deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


ZERO3_SAVE_JOIN_TIMEOUT_ENV = "PERFT_ZERO3_SAVE_JOIN_TIMEOUT_S"
"""How long (seconds, default 300) a rank waits for the others to come to the gather of a ZeRO-3 adapter save."""
_GATHER_CALLS = itertools.count()


@contextlib.contextmanager
def _all_ranks_checked_in() -> Iterator[None]:
    """Wait, through the process group's key-value store (no collective), until every rank has come to this
    gather; raise if one does not come within the timeout instead of leaving this rank in a collective the others
    never join (or, worse, one they join from an unrelated call).

    A rank that calls ``save_pretrained`` with ``is_main_process=False`` and no state dict does not gather (that is
    Accelerate's documented save, whose main process passes the state dict); next to a main process that passes no
    state dict, only this check tells the two apart from a hang."""
    if not is_distributed():
        yield
        return
    store = dist.distributed_c10d._get_default_store()
    call, rank, world = next(_GATHER_CALLS), dist.get_rank(), dist.get_world_size()
    keys = [f"perft_zero3_adapter_gather/{call}/{other}" for other in range(world)]
    store.set(keys[rank], "here")
    timeout_s = float(os.environ.get(ZERO3_SAVE_JOIN_TIMEOUT_ENV, 300))
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except dist.DistStoreError as error:
        absent = [other for other, key in enumerate(keys) if not store.check([key])]
        raise RuntimeError(
            f"PERFT's save_pretrained on a DeepSpeed ZeRO-3 model gathers the partitioned adapter, a collective "
            f"every rank must join; rank {rank} waited {timeout_s:g} s ({ZERO3_SAVE_JOIN_TIMEOUT_ENV}) but ranks "
            f"{absent} did not come to it. A rank that passes is_main_process=False and no state_dict gathers "
            f"nothing, so call save_pretrained(output_dir) the same way on every rank, or as Accelerate documents it: "
            f"save_pretrained(output_dir, is_main_process=accelerator.is_main_process, "
            f"state_dict=accelerator.get_state_dict(model)) on every rank."
        ) from error
    yield
    store.delete_key(keys[rank])  # every rank has passed its wait: the collective needed them all


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 manages (each rank holds a slice; the tensor itself is an empty placeholder)."""
    return hasattr(tensor, "ds_id")


def saving_gathered_adapter(save_pretrained: Callable) -> Callable:
    """Wrap peft's save: in a multi-process run, a PERFT model passes peft its gathered adapter as ``state_dict``
    (unless the caller gives one, as the Trainer does under Accelerate's FSDP and DeepSpeed)."""

    @functools.wraps(save_pretrained)
    def save_perft_adapter(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None and _holds_perft_adapter(self) and _gathers(self, kwargs):
            kwargs["state_dict"] = gathered_adapter_state_dict(self)
        return save_pretrained(self, save_directory, *args, **kwargs)

    return save_perft_adapter


def _gathers(model: PeftModel, save_kwargs: dict[str, Any]) -> bool:
    """Whether this rank's save gathers the adapter. Under ZeRO-3 only a rank that writes does: the Trainer calls
    ``save_pretrained`` on the main process alone, and Accelerate's documented save passes the main process the
    state dict of ``accelerator.get_state_dict`` and the other ranks ``None`` with ``is_main_process=False``."""
    if any(is_zero3_partitioned(parameter) for parameter in model.parameters()):
        return save_kwargs.get("is_main_process", True)
    return is_distributed()


def _holds_perft_adapter(model: PeftModel) -> bool:
    from ..config import PerftConfig

    return any(isinstance(config, PerftConfig) for config in getattr(model, "peft_config", {}).values())


def _is_adapter_key(key: str) -> bool:
    return MODULES_TO_SAVE_MARKER in key or any(marker in f"{key}." for marker in ADAPTER_KEY_MARKERS)


def _all_selected_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A selective PERFT-E tensor whole, from the rows each EP rank holds (unequal counts: gathered as objects),
    which in rank order are the rows in expert order."""
    group = getattr(tensor, SELECTED_ROWS_ATTRIBUTE).group
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, tensor.detach().cpu(), group=group)
    return torch.cat(parts)


def distribute_like(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, as saved) laid out as ``reference``: this rank's shard when ``reference`` is a DTensor,
    its rows for selective PERFT-E under expert parallelism.

    Every rank loads the same file, so each takes its own shard without communication."""
    selected = getattr(reference, SELECTED_ROWS_ATTRIBUTE, None)
    if selected is not None:
        return tensor[selected.rows]
    if not isinstance(reference, DTensor) or isinstance(tensor, DTensor):
        return tensor
    return distribute_tensor(tensor, reference.device_mesh, reference.placements, src_data_rank=None)


def distribute_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded adapter state dict with each tensor laid out as the model's (sharded PERFT-E tensors)."""
    own = model.state_dict(keep_vars=True)
    return {key: distribute_like(own[key], tensor) if key in own else tensor for key, tensor in state_dict.items()}
