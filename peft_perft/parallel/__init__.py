"""PERFT on models that Transformers sharded at load time (``from_pretrained(distributed_config=...)``) or that the
user sharded with FSDP2 after `get_peft_model`.

The distributed layouts wrap the core block (`peft_perft.layer`), which imports none of them; one module per job:

- `saving`: gather only the adapter on save (and the ZeRO-3 check-in), lay a loaded one out as the model's;
- `replication`: the adapter the same on every rank, its gradients averaged;
- `expert_parallel`: PERFT-E sharded like the experts (``ep_implementation="perft"``);
- `token_slices`: R, D and S on each TP rank's token rows under TP with EP;
- `tensor_parallel`: any variant split on its bottleneck over the TP ranks, in PERFT's wrapper of the experts.

`model.PerftModel` calls the verbs below, as peft calls its dispatchers: `prepare` once it found the MoE blocks,
`place` after each new adapter, `replicate_adapter` and `warn_uneven_selection` after injection,
`distribute_adapter_state_dict` on load, `release` on unload.
"""

from __future__ import annotations

from torch import nn

from .expert_parallel import shard_routed_adapter, split_over_token_rows, warn_uneven_selection
from .replication import refuse_unsupported_layout, replicate_adapter
from .saving import distribute_adapter_state_dict
from .tensor_parallel import (
    attach_tensor_parallel_mesh,
    find_tensor_parallel_mesh,
    release_tensor_parallel_experts,
    split_over_tensor_parallel,
)

__all__ = [
    "distribute_adapter_state_dict",
    "place",
    "prepare",
    "refuse_unsupported_layout",
    "release",
    "replicate_adapter",
    "warn_uneven_selection",
]


def prepare(model: nn.Module, experts_modules: list[nn.Module]) -> None:
    """Give the experts modules the model's TP mesh where PERFT can split its adapter over it (read from
    Transformers' private mesh manager, with one warning where that is not as checked)."""
    mesh = find_tensor_parallel_mesh(model)
    if mesh is not None:
        attach_tensor_parallel_mesh(experts_modules, mesh)


def place(block: nn.Module, adapter_name: str) -> None:
    """Lay a new adapter's tensors out as the engines shard its block: PERFT-E like the experts under expert
    parallelism (`PerftExpertParallel`), any variant on its bottleneck under tensor parallelism
    (`tensor_parallel`); replicated where neither applies."""
    follows_base_routing = block.perft_configs[adapter_name].follows_base_routing
    if follows_base_routing and shard_routed_adapter(block, adapter_name):
        return
    if not split_over_tensor_parallel(block, adapter_name) and not follows_base_routing:
        split_over_token_rows(block, adapter_name)


def release(block: nn.Module) -> None:
    """Give the block's experts back what the layouts wrapped them in (on unload)."""
    release_tensor_parallel_experts(block)
