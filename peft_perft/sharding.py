"""PERFT on models that Transformers sharded at load time (``from_pretrained(distributed_config=...)``) or that the
user sharded with FSDP2 after `get_peft_model`.

Two things go wrong there without this module:

- **Saving.** peft's `get_peft_model_state_dict` gathers the *whole* model state dict (every base weight, as a
  collective ``DTensor.full_tensor()`` per tensor) before keeping the adapter keys. That does not fit at DeepSeek-V3
  scale, and since the Trainer calls ``save_pretrained`` with ``is_main_process`` false on the other ranks, any
  extra gather done only on the main process (the model card used to do one) leaves one rank waiting in a
  collective the others never join. `install_sharding_hooks` makes `PeftModel.save_pretrained` gather only the
  adapter's tensors, on every rank, in one fixed order, and hand peft that small state dict.
- **Training.** PERFT's tensors are created after Transformers applied FSDP (``fsdp_size``), so no engine manages
  them: their gradients would never be averaged and each rank would train its own adapter. `replicate_adapter`
  broadcasts them from rank 0 and averages their gradients over all ranks after every backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor

from .loading import ADAPTER_KEY_MARKERS

_HOOKED = "__perft_sharding_hook__"
# Transformers' Trainer registers its own gradient average for replicated parameters unless this flag is set.
TRAINER_HOOK_FLAG = "_replicated_grad_hook_registered"
MODULES_TO_SAVE_MARKER = ".modules_to_save."


def is_distributed() -> bool:
    """More than one process in the default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_config_of(model: nn.Module) -> Any:
    """The `DistributedConfig` Transformers sharded ``model`` with at load time, or None."""
    return getattr(getattr(model, "config", None), "distributed_config", None)


def gathered_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PERFT's and any ``modules_to_save``), whole and on CPU, keyed as in ``state_dict()``.

    Sharded tensors are gathered with one collective each, in ``state_dict()`` order, so every rank must call this;
    base weights are neither gathered nor copied.
    """
    gathered = {}
    for key, tensor in model.state_dict().items():
        if not _is_adapter_key(key):
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        # A copy, not a view of the live parameter: the optimiser must not change a state dict being saved.
        gathered[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return gathered


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


def install_sharding_hooks() -> None:
    """Make `PeftModel.save_pretrained` gather only the adapter on sharded PERFT models (idempotent)."""
    if not getattr(PeftModel.save_pretrained, _HOOKED, False):
        PeftModel.save_pretrained = _saving_gathered_adapter(PeftModel.save_pretrained)


def _saving_gathered_adapter(save_pretrained: Callable) -> Callable:
    """Wrap peft's save: in a multi-process run, a PERFT model passes peft its gathered adapter as ``state_dict``
    (unless the caller gives one, as the Trainer does under Accelerate's FSDP and DeepSpeed)."""

    @functools.wraps(save_pretrained)
    def save_perft_adapter(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None and is_distributed() and _holds_perft_adapter(self):
            kwargs["state_dict"] = gathered_adapter_state_dict(self)
        return save_pretrained(self, save_directory, *args, **kwargs)

    setattr(save_perft_adapter, _HOOKED, True)
    return save_perft_adapter


def _average_gradient(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)


def _unmanaged_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that are plain tensors, in a fixed order (the same on every rank)."""
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def _holds_perft_adapter(model: PeftModel) -> bool:
    from .config import PerftConfig

    return any(isinstance(config, PerftConfig) for config in getattr(model, "peft_config", {}).values())


def _is_adapter_key(key: str) -> bool:
    return MODULES_TO_SAVE_MARKER in key or any(marker in f"{key}." for marker in ADAPTER_KEY_MARKERS)
