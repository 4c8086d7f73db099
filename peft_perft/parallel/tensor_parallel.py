"""PERFT split over the ranks of Transformers' tensor parallelism instead of repeated on each.

Under ``DistributedConfig(tp_size=...)`` (without expert parallelism) Transformers shards every expert's
intermediate dimension over the TP ranks (``moe_tp_experts`` in the models' ``base_model_tp_plan``): each rank
computes a partial output of all experts for all tokens of the batch the TP ranks share, and one all-reduce sums
them; the experts' input and routing weights get the matching all-reduce of their gradients in backward.

An adapter expert ``B act(A h)`` splits the same way over its bottleneck: with ``A`` sharded on ``r`` (rows) and
``B`` on ``r`` (columns), rank ``i`` computes ``B_i act(A_i h)`` and the sum over ranks is the whole term, as
``act`` acts on each bottleneck unit alone. So each rank holds and computes ``r / tp`` of every adapter expert
(``perft_A`` / ``perft_B`` are DTensors sharded on ``r`` over the TP mesh) and adds its partial term to the
experts' partial output *before* their all-reduce: no extra collective in forward. The adapter reads the experts'
input (and PERFT-E the routing weights) after the gradient all-reduces Transformers put there, so its partial
input gradients are summed by those too.

PERFT-R's router stays replicated (it is tiny): every rank routes every token. Its top-k weights get partial
gradients (each rank sees its share of the bottleneck), which one all-reduce of those (tokens x top-k) values sums
in backward, so the router's gradient is whole on every rank and the auxiliary load-balancing loss (computed on
every rank from the replicated router) is counted once.

With data parallelism beside TP (``fsdp_size`` / ``dp_replicate_size``) the TP groups of different batches hold
the same shards: each shard is created from global rank 0's values and its gradient averaged over the
data-parallel ranks after each backward (as `replication.replicate_adapter` does for replicated tensors over all
ranks).

Where this cannot apply the adapter stays replicated, as before: ``r`` not divisible by ``tp_size`` (uneven
shards, and no share at all where ``r < tp_size``), expert parallelism (``ep_size > 1``: the experts are then
dispatched by EP, not split by TP, and the only collective over a TP group is the all-gather of disjoint token
slices, which a partial term cannot join: with ``ep_implementation="perft"`` R, D and S are computed on each TP
rank's token rows there instead, see ``token_slices.TokenSlicedAllToAll`` and docs/big_models.md), blocks whose
experts do not run under ``moe_tp_experts``, and PERFT-E on blocks that take its routing from the router's output
(Llama 4, JetMoE).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from transformers.distributed.parallel_utils import _AllReduceBackward
from transformers.distributed.tensor_parallel import MoeExpertsParallel

from ..terms import AdapterTensors, add_term, no_record

BOTTLENECK_PLACEMENTS = {"perft_A": Shard(1), "perft_B": Shard(2)}
"""Where ``r`` sits in the stacked adapter tensors: ``perft_A`` (N, r, D) and ``perft_B`` (N, D, r)."""
OWNER = "tensor_parallel"
"""The block's ``term_owners`` entry of an adapter split here: its term is added inside `TensorParallelExperts`."""


def split_over_tensor_parallel(block: nn.Module, adapter_name: str) -> bool:
    """Shard a new adapter's bottleneck over the TP ranks of the block's experts, when they run under
    Transformers' ``moe_tp_experts`` and the layout allows it (see the module docstring); True when it did."""
    experts = _experts_of(block)
    if experts is None:
        return False
    tensor_parallel = TensorParallelExperts.of(experts) or _tensor_parallel_style(experts)
    if tensor_parallel is None or not _can_split(block, experts, adapter_name, tensor_parallel.mesh):
        return False
    data_parallel = _data_parallel_groups(tensor_parallel.mesh)
    for kind, placement in BOTTLENECK_PLACEMENTS.items():
        tensors = getattr(block, kind)
        whole = tensors[adapter_name]
        if data_parallel:  # each TP group scatters from its own first rank: give them all global rank 0's values
            dist.broadcast(whole.data, src=0)
        # Every rank built the whole tensor; rank 0's values are scattered, so all ranks agree whatever their seed.
        split = nn.Parameter(
            distribute_tensor(whole.data, tensor_parallel.mesh, [placement]), requires_grad=whole.requires_grad
        )
        if data_parallel:
            split.register_post_accumulate_grad_hook(functools.partial(_average_shard, groups=data_parallel))
        tensors[adapter_name] = split
    block.term_owners[adapter_name] = OWNER
    TensorParallelExperts.install(block, experts, tensor_parallel)
    return True


def is_split_over_tensor_parallel(block: nn.Module, adapter_name: str) -> bool:
    """Whether an adapter of a block whose experts run `TensorParallelExperts` is computed inside it."""
    return block.term_owners.get(adapter_name) == OWNER


def is_block_input_unchanged(experts_input: torch.Tensor, block_input: torch.Tensor, version: int) -> bool:
    """Whether the experts got the block's input itself, flattened (a view of the same storage), and unchanged in
    place since its version was ``version`` (Mixtral's router jitter scales it in training)."""
    flat = block_input.reshape(-1, block_input.shape[-1])
    return (
        experts_input.data_ptr() == flat.data_ptr()
        and experts_input.shape == flat.shape
        and experts_input.stride() == flat.stride()
        and block_input._version == version
    )


def release_tensor_parallel_experts(block: nn.Module) -> None:
    """Give the block's experts Transformers' TP forward back (on unload)."""
    experts = _experts_of(block)
    wrapper = None if experts is None else TensorParallelExperts.of(experts)
    if wrapper is not None and wrapper.block is block:
        wrapper.uninstall()


def _experts_of(block: nn.Module) -> nn.Module | None:
    """The block's experts module; None for blocks without one (Doge's embedding experts), never split."""
    return None if block.spec.experts_name is None else block.spec.experts_module(block.base_layer)


class _TensorParallelStyle:
    """What Transformers installed on a ``moe_tp_experts`` module: the style, its TP mesh, the experts' own
    forward and the TP forward that wraps it."""

    def __init__(self, style: MoeExpertsParallel, mesh: DeviceMesh, inner: Callable, outer: Callable) -> None:
        self.style, self.mesh, self.inner, self.outer = style, mesh, inner, outer


def _tensor_parallel_style(experts: nn.Module) -> _TensorParallelStyle | None:
    """Transformers' ``moe_tp_experts`` forward on this module, read from the closure its ``install_forward``
    made; None for any other forward (expert parallelism, no TP, another wrapper), which leaves PERFT replicated."""
    forward = vars(experts).get("forward")
    if forward is None or not inspect.isfunction(forward):
        return None
    captured = inspect.getclosurevars(forward).nonlocals
    style, mesh, inner = captured.get("self"), captured.get("mesh"), captured.get("original_forward")
    if not isinstance(style, MoeExpertsParallel) or not isinstance(mesh, DeviceMesh) or inner is None:
        return None
    return _TensorParallelStyle(style, mesh, inner, forward)


def _can_split(block: nn.Module, experts: nn.Module, adapter_name: str, mesh: DeviceMesh) -> bool:
    """The layouts where each TP rank can take ``r / tp`` of the adapter (its gradients averaged over the
    data-parallel ranks, if any, as the replicated adapter's are)."""
    distributed = getattr(getattr(experts, "config", None), "distributed_config", None)
    if distributed is None or distributed.ep_size > 1 or distributed.pp_size > 1:
        return False
    config = block.perft_configs[adapter_name]
    if config.variant == "E" and block.spec.routes_from_router:
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


class TensorParallelExperts:
    """The forward of a ``moe_tp_experts`` module whose block holds TP-split adapters: Transformers' input
    transform, the experts' own forward, each active adapter's partial term on this rank's bottleneck share, then
    Transformers' all-reduce of the sum.

    A callable object rather than a closure, so that ``copy.deepcopy`` of a model rebinds it to the copies."""

    def __init__(self, block: nn.Module, experts: nn.Module, tensor_parallel: _TensorParallelStyle) -> None:
        self.block, self.experts, self.tensor_parallel = block, experts, tensor_parallel
        self.mesh = tensor_parallel.mesh
        self.block_input: torch.Tensor | None = None
        self._block_input_copy: torch.Tensor | None = None
        self._handles = [
            block.register_forward_pre_hook(self._record_block_input, with_kwargs=True),
            block.register_forward_hook(self._forget_block_input, always_call=True),
        ]

    @classmethod
    def of(cls, experts: nn.Module) -> TensorParallelExperts | None:
        wrapper = vars(experts).get("forward")
        return wrapper if isinstance(wrapper, cls) else None

    @classmethod
    def install(
        cls, block: nn.Module, experts: nn.Module, tensor_parallel: _TensorParallelStyle | TensorParallelExperts
    ) -> None:
        """Wrap Transformers' TP forward once per experts module (a later adapter finds the wrapper in place)."""
        if not isinstance(tensor_parallel, cls):
            experts.forward = cls(block, experts, tensor_parallel)

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.experts.forward = self.tensor_parallel.outer

    def _record_block_input(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        self.block_input = args[0] if args else kwargs["hidden_states"]
        self._block_input_version = self.block_input._version
        # A block may scale its input in place in training (Mixtral's router jitter): the adapters then read this
        # copy, as they read the unscaled input in one process (where the block gets a copy instead).
        copy = block.training and bool(self._beside_adapters())
        self._block_input_copy = self.block_input.clone() if copy else None

    def _forget_block_input(self, *unused: Any) -> None:
        self.block_input = self._block_input_copy = None

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        beside, routed = self._active_split_adapters()
        if not beside and not routed:
            return self.tensor_parallel.outer(hidden_states, *args, **kwargs)
        style, experts, configs = self.tensor_parallel.style, self.experts, self.block.perft_configs
        (shared, *routing), kwargs = style.transform_inputs_pre_forward(
            experts, (hidden_states, *args), kwargs, self.mesh
        )
        with style.context_around_forward(experts, self.mesh):
            output = self.tensor_parallel.inner(shared, *routing, **kwargs)
        terms = []
        if beside:
            router_input, adapter_input = self._adapter_inputs(hidden_states, shared)
            terms += [(name, self._partial_term(name, router_input, adapter_input)) for name in beside]
        if routed:
            tokens, expert_index, expert_weight = self.block.spec.read_experts_call((shared, *routing), kwargs)
            terms += [(name, self._partial_routed_term(name, tokens, expert_index, expert_weight)) for name in routed]
        for name, delta in terms:
            output = add_term(output, delta, configs[name].scaling)
        return style.transform_output_post_forward(experts, output, self.mesh)

    def _active_split_adapters(self) -> tuple[list[str], list[str]]:
        """The split adapters this call adds: R, D and S ones active in the block's current forward, and the E
        ones the block queued for this experts call (which its experts hook then skips)."""
        block = self.block
        routed = block.routed_adapters_owned_by(OWNER)
        if self.block_input is None:
            return [], routed
        return self._beside_adapters(), routed

    def _beside_adapters(self) -> list[str]:
        """The split R, D and S adapters active in the block."""
        block = self.block
        return [
            name
            for name in block.active_perft_adapters()
            if block.perft_configs[name].variant != "E" and is_split_over_tensor_parallel(block, name)
        ]

    def _adapter_inputs(self, experts_input: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input (T, D), as the router reads it and as the adapter experts read it.

        The experts normally get the block's input itself, flattened; the adapter experts then read it after the
        experts' gradient all-reduce (``shared``), which sums their partial input gradients too. Where the block
        changed it first (Mixtral's router jitter scales it in place in training), the adapters read the copy of
        the block's input taken before, with an all-reduce of its gradient of their own."""
        block_input = self.block_input
        if is_block_input_unchanged(experts_input, block_input, self._block_input_version):
            return experts_input, shared
        flat = block_input.reshape(-1, block_input.shape[-1])
        if self._block_input_copy is not None:
            flat = self._block_input_copy.reshape(flat.shape)
        return flat, _AllReduceBackward.apply(flat, self.mesh.get_group())

    def _partial_routed_term(
        self, name: str, tokens: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        """This rank's share of a PERFT-E adapter's (unscaled) term, with the base routing the experts received
        (weights after their gradient all-reduce; the block's experts hook records that routing)."""
        routing = (expert_index, expert_weight)
        return self.block.adapter_term(name, tokens, tensors=self._local(name), routing=routing, record=no_record)

    def _partial_term(self, name: str, router_input: torch.Tensor, adapter_input: torch.Tensor) -> torch.Tensor:
        """This rank's share of the adapter's (unscaled) term: ``sum B_i act(A_i h)`` over its bottleneck rows, the
        routing weights' partial gradients summed over the TP ranks."""
        group = self.mesh.get_group()

        def summed_weight_gradients(index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return index, _AllReduceBackward.apply(weight, group)

        return self.block.adapter_term(
            name,
            adapter_input,
            tensors=self._local(name),
            router_input=router_input,
            local_routing=summed_weight_gradients,
        )

    def _local(self, name: str) -> AdapterTensors:
        """This rank's slices of the adapter's experts (``r / tp`` of each bottleneck) and its replicated router."""
        lora_A, lora_B, router = self.block.adapter_tensors(name)
        return AdapterTensors(lora_A.to_local(), lora_B.to_local(), router)
