"""PERFT split over the ranks of Transformers' tensor parallelism instead of repeated on each.

Under ``DistributedConfig(tp_size=...)`` without expert parallelism the ranks of a TP group share one batch and get
the same MoE block output: since Transformers 5.25 the models' ``base_model_tp_plan`` leaves the experts whole on
every rank (the ``moe_tp_experts`` style, which split each expert's intermediate dimension, is deprecated and
only Llama 4's plan still names it; its output is then summed over the TP ranks, so it is whole too).

An adapter expert ``B act(A h)`` splits over its bottleneck: with ``A`` sharded on ``r`` (rows) and ``B`` on ``r``
(columns), rank ``i`` computes ``B_i act(A_i h)`` and the sum over ranks is the whole term, as ``act`` acts on each
bottleneck unit alone. So each rank holds and computes ``r / tp`` of every adapter expert (``perft_A`` /
``perft_B`` are DTensors sharded on ``r`` over the TP mesh), and the sum of the ranks' partial terms is added where
one process adds the whole term: R's, D's and S's to the block's output (`SplitBlockTerms`, which the block calls),
PERFT-E's to the experts' output (`TensorParallelExperts`, PERFT's wrapper of the experts' forward). Many blocks
change the experts' output before returning it (a scaling factor, a norm, an average with the shared experts), so
the place matters. Per block: one all-reduce of the (tokens x hidden) terms in forward, and one of their input's
gradient in backward. Both are DTensor redistributions (public torch API), not Transformers' private autograd
functions.

PERFT-R's router stays replicated (it is tiny): every rank routes every token. Its top-k weights get partial
gradients (each rank sees its share of the bottleneck), which one all-reduce of those (tokens x top-k) values sums
in backward, so the router's gradient is whole on every rank and the auxiliary load-balancing loss (computed on
every rank from the replicated router) is counted once.

With data parallelism beside TP (``fsdp_size`` / ``dp_replicate_size``) the TP groups of different batches hold
the same shards: each shard is created from global rank 0's values and its gradient averaged over the
data-parallel ranks after each backward (as `replication.replicate_adapter` does for replicated tensors over all
ranks).

The one Transformers detail this relies on is private: the TP mesh, read from the model's ``_mesh_manager``
(checked on Transformers `CHECKED_TRANSFORMERS_VERSION`). `find_tensor_parallel_mesh` reads it at
`get_peft_model`; where it is not there the adapter stays replicated and `warn_fallback_once` says so.

Where the split cannot apply the adapter stays replicated too: ``r`` not divisible by ``tp_size`` (uneven shards,
and no share at all where ``r < tp_size``), expert parallelism (``ep_size > 1``: the experts are then dispatched by
EP; with ``ep_implementation="perft"`` R, D and S are computed on each TP rank's token rows there instead, see
``token_slices.TokenRowTerms`` and docs/big_models.md), and PERFT-E on blocks that take its routing from the
router's output (Llama 4, JetMoE): it is added to the block's output there, not inside the experts' call.
"""

from __future__ import annotations

import functools
import warnings
from importlib.metadata import version
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from ..dispatch import as_dtype
from ..terms import AdapterTensors, no_record, scaled_sum

BOTTLENECK_PLACEMENTS = {"perft_A": Shard(1), "perft_B": Shard(2)}
"""Where ``r`` sits in the stacked adapter tensors: ``perft_A`` (N, r, D) and ``perft_B`` (N, D, r)."""
OWNER = "tensor_parallel"
"""The block's ``term_owners`` entry of an adapter split here: its term is added by `SplitBlockTerms` (R, D, S) or
`TensorParallelExperts` (E)."""

CHECKED_TRANSFORMERS_VERSION = "5.25.0"
"""The Transformers release whose private details PERFT's parallel code was last checked against."""

TENSOR_PARALLEL_SPLIT = "the split of PERFT's adapter over tensor-parallel ranks"
_MESH_ATTRIBUTE = "perft_tensor_parallel_mesh"
_WARNED_FEATURES: set[str] = set()


class UpstreamDetailWarning(UserWarning):
    """A private detail of Transformers that a PERFT feature relies on is not as checked: the feature falls back."""


def warn_fallback_once(feature: str, missing: str, fallback: str) -> None:
    """Warn, once per process and feature, that ``feature`` falls back to ``fallback`` because ``missing`` (a
    private Transformers detail) is not as it was on `CHECKED_TRANSFORMERS_VERSION`."""
    if feature in _WARNED_FEATURES:
        return
    _WARNED_FEATURES.add(feature)
    warnings.warn(
        f"PERFT: {feature} relies on a private detail of Transformers, checked on transformers "
        f"{CHECKED_TRANSFORMERS_VERSION}, which the installed transformers {version('transformers')} does not have "
        f"as expected ({missing}). Falling back: {fallback}. Results stay correct; to get the feature back, use "
        f"transformers {CHECKED_TRANSFORMERS_VERSION} or a PERFT release checked on yours.",
        UpstreamDetailWarning,
        stacklevel=2,
    )


def find_tensor_parallel_mesh(model: nn.Module) -> DeviceMesh | None:
    """The TP mesh of a model Transformers sharded with ``tp_size > 1`` and no expert or pipeline parallelism (the
    layouts where PERFT splits its adapter over TP), read from the model's private ``_mesh_manager``; None for
    other models, and, with one warning, where that detail is not as checked."""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    if distributed is None or distributed.tp_size <= 1 or distributed.ep_size > 1 or distributed.pp_size > 1:
        return None
    mesh = _transformers_tensor_parallel_mesh(model)
    if mesh is None or mesh.size() != distributed.tp_size:
        warn_fallback_once(
            TENSOR_PARALLEL_SPLIT,
            f"model._mesh_manager.get_mesh('tp'), a DeviceMesh of tp_size={distributed.tp_size} ranks",
            "the adapter stays replicated, every TP rank holding and computing all of it",
        )
        return None
    return mesh


def _transformers_tensor_parallel_mesh(model: nn.Module) -> DeviceMesh | None:
    """``model._mesh_manager.get_mesh("tp")``, or None where Transformers has no such thing."""
    get_mesh = getattr(getattr(model, "_mesh_manager", None), "get_mesh", None)
    if get_mesh is None:
        return None
    try:
        mesh = get_mesh("tp")
    except (KeyError, ValueError, RuntimeError):
        return None
    return mesh if isinstance(mesh, DeviceMesh) else None


def attach_tensor_parallel_mesh(experts_modules: list[nn.Module], mesh: DeviceMesh) -> None:
    """Give each experts module the model's TP mesh, where `split_over_tensor_parallel` finds it for its block."""
    for experts in experts_modules:
        object.__setattr__(experts, _MESH_ATTRIBUTE, mesh)


def split_over_tensor_parallel(block: nn.Module, adapter_name: str) -> bool:
    """Shard a new adapter's bottleneck over the TP ranks of the block's experts, when `get_peft_model` found the
    model's TP mesh and the layout allows it (see the module docstring); True when it did."""
    experts = _experts_of(block)
    mesh = None if experts is None else getattr(experts, _MESH_ATTRIBUTE, None)
    if mesh is None or not _can_split(block, adapter_name, mesh):
        return False
    data_parallel = _data_parallel_groups(mesh)
    for kind, placement in BOTTLENECK_PLACEMENTS.items():
        tensors = getattr(block, kind)
        whole = tensors[adapter_name]
        if data_parallel:  # each TP group scatters from its own first rank: give them all global rank 0's values
            dist.broadcast(whole.data, src=0)
        # Every rank built the whole tensor; rank 0's values are scattered, so all ranks agree whatever their seed.
        split = nn.Parameter(distribute_tensor(whole.data, mesh, [placement]), requires_grad=whole.requires_grad)
        if data_parallel:
            split.register_post_accumulate_grad_hook(functools.partial(_average_shard, groups=data_parallel))
        tensors[adapter_name] = split
    block.term_owners[adapter_name] = OWNER
    if block.perft_configs[adapter_name].follows_base_routing:
        TensorParallelExperts.install(block, experts, mesh)
    elif block.split_terms is None:
        block.split_terms = SplitBlockTerms(block, mesh)
    return True


def is_split_over_tensor_parallel(block: nn.Module, adapter_name: str) -> bool:
    """Whether the adapter is split over the TP ranks (and its term added by this module's code)."""
    return block.term_owners.get(adapter_name) == OWNER


def release_tensor_parallel_experts(block: nn.Module) -> None:
    """Give the block's experts the forward they had before PERFT's TP wrapper back (on unload)."""
    experts = _experts_of(block)
    wrapper = None if experts is None else TensorParallelExperts.of(experts)
    if wrapper is not None and wrapper.block is block:
        wrapper.uninstall()


def _experts_of(block: nn.Module) -> nn.Module | None:
    """The block's experts module; None for blocks without one (Doge's embedding experts), never split."""
    return None if block.spec.experts_name is None else block.spec.experts_module(block.base_layer)


def _can_split(block: nn.Module, adapter_name: str, mesh: DeviceMesh) -> bool:
    """The adapters each TP rank can take ``r / tp`` of."""
    config = block.perft_configs[adapter_name]
    if config.follows_base_routing and block.spec.routes_from_router:
        return False
    return config.r % mesh.size() == 0


def _data_parallel_groups(mesh: DeviceMesh) -> list[dist.ProcessGroup]:
    """The process groups of the data-parallel dimensions (``dp_replicate``, ``fsdp``) of the mesh Transformers
    sliced the TP mesh from, those over more than one rank: this rank and the ranks holding the same shard of the
    adapter on other batches."""
    root = mesh._get_root_mesh()
    names = root.mesh_dim_names or ()
    return [root[name].get_group() for name in ("dp_replicate", "fsdp") if name in names and root[name].size() > 1]


def _average_shard(parameter: nn.Parameter, groups: list[dist.ProcessGroup]) -> None:
    """Average this rank's shard of the gradient over the ranks that hold the same shard on other batches (after
    each backward, which is also right under gradient accumulation, see ``replication.replicate_adapter``)."""
    local = parameter.grad.to_local()
    for group in groups:
        dist.all_reduce(local, op=dist.ReduceOp.AVG, group=group)


def gradient_summed_over(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``tensor`` itself, whose gradient in backward is the sum of the ranks' (each rank's is partial)."""
    if not (torch.is_grad_enabled() and tensor.requires_grad):
        return tensor
    replicated = DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)
    return replicated.to_local(grad_placements=[Partial()])


def summed_over(partial: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum over the ranks of their partial ``partial``; its gradient, whole on every rank, passes unchanged."""
    summed = DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    return summed.to_local()


class SplitBlockTerms:
    """The R, D and S terms of a block's split adapters, called by the block where one process adds their whole
    terms: the sum over the TP ranks of each adapter's partial term on this rank's bottleneck share, whole on every
    rank.

    A callable object rather than a closure, so that ``copy.deepcopy`` of a model rebinds it to the copies."""

    def __init__(self, block: nn.Module, mesh: DeviceMesh) -> None:
        self.block, self.mesh = block, mesh

    def __call__(self, names: list[str], hidden_states: torch.Tensor) -> torch.Tensor:
        """The scaled sum of the named adapters' terms on the block's input (T, D); the input's partial gradients
        and the routing weights' are summed over the TP ranks (the router stays replicated)."""
        router_input = hidden_states.reshape(-1, hidden_states.shape[-1])
        adapter_input = gradient_summed_over(router_input, self.mesh)
        local = {"router_input": router_input, "local_routing": self._summed_weight_gradients}
        partial = scaled_sum(
            [
                (
                    self.block.adapter_term(name, adapter_input, tensors=local_tensors(self.block, name), **local),
                    self.block.perft_configs[name].scaling,
                )
                for name in names
            ]
        )
        return summed_over(partial, self.mesh)

    def _summed_weight_gradients(self, index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return index, gradient_summed_over(weight, self.mesh)


class TensorParallelExperts:
    """The forward of an experts module whose block holds TP-split PERFT-E adapters: the experts' forward as it was
    (whole on every rank), plus the sum over the TP ranks of each adapter's partial term on this rank's bottleneck
    share, with the routing the experts received.

    A callable object rather than a closure, so that ``copy.deepcopy`` of a model rebinds it to the copies."""

    def __init__(self, block: nn.Module, experts: nn.Module, mesh: DeviceMesh) -> None:
        self.block, self.experts, self.mesh = block, experts, mesh
        # The forward installed before this one (PERFT-E's in-dispatch wrapper, Transformers' TP forward), if any.
        self.previous = vars(experts).get("forward")

    @classmethod
    def of(cls, experts: nn.Module) -> TensorParallelExperts | None:
        wrapper = vars(experts).get("forward")
        return wrapper if isinstance(wrapper, cls) else None

    @classmethod
    def install(cls, block: nn.Module, experts: nn.Module, mesh: DeviceMesh) -> None:
        """Wrap the experts' forward once per experts module (a later adapter finds the wrapper in place)."""
        if cls.of(experts) is None:
            experts.forward = cls(block, experts, mesh)

    def uninstall(self) -> None:
        if self.previous is None:
            del self.experts.forward
        else:
            self.experts.forward = self.previous

    def _experts_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.experts).forward(self.experts, *args, **kwargs)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts' output plus the split E adapters the block queued for this call (its experts hook then
        skips them, and records their routing)."""
        routed = self.block.routed_adapters_owned_by(OWNER)
        output = self._experts_forward(hidden_states, *args, **kwargs)
        if not routed:
            return output
        tokens, expert_index, expert_weight = self.block.spec.read_experts_call((hidden_states, *args), kwargs)
        tokens = gradient_summed_over(tokens, self.mesh)
        routing = (expert_index, gradient_summed_over(expert_weight, self.mesh))
        partial = scaled_sum(
            [
                (
                    self.block.adapter_term(
                        name, tokens, tensors=local_tensors(self.block, name), routing=routing, record=no_record
                    ),
                    self.block.perft_configs[name].scaling,
                )
                for name in routed
            ]
        )
        return output + summed_over(as_dtype(partial, output.dtype).view(output.shape), self.mesh)


def local_tensors(block: nn.Module, name: str) -> AdapterTensors:
    """This rank's slices of the adapter's experts (``r / tp`` of each bottleneck) and its replicated router."""
    lora_A, lora_B, router = block.adapter_tensors(name)
    return AdapterTensors(lora_A.to_local(), lora_B.to_local(), router)
