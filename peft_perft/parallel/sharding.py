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

Under expert parallelism PERFT-E can also be sharded like the experts: `PerftExpertParallel`, registered with
Transformers as ``ep_implementation="perft"``, computes each adapter expert's term on the rank owning the base
expert, inside the experts' own token dispatch; with tensor parallelism beside EP it also computes R, D and S on
each TP rank's rows of the shared tokens (`TokenSlicedAllToAll`) instead of on all of them on every rank.
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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from transformers.distributed.expert_parallel import AllToAllEP, AutoEP, EPImplementation, EPImplementationInterface

from ..dispatch import add_scaled
from ..loading import ADAPTER_KEY_MARKERS
from .tensor_parallel import is_block_input_unchanged, split_over_tensor_parallel

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
    with _zero3_gathered(model):
        for key, tensor in model.state_dict().items():
            if not _is_adapter_key(key):
                continue
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
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
    """Make `PeftModel.save_pretrained` gather only the adapter on sharded PERFT models, and register
    `PerftExpertParallel` with Transformers (idempotent)."""
    install_expert_parallel()
    if not getattr(PeftModel.save_pretrained, _HOOKED, False):
        PeftModel.save_pretrained = _saving_gathered_adapter(PeftModel.save_pretrained)


def _saving_gathered_adapter(save_pretrained: Callable) -> Callable:
    """Wrap peft's save: in a multi-process run, a PERFT model passes peft its gathered adapter as ``state_dict``
    (unless the caller gives one, as the Trainer does under Accelerate's FSDP and DeepSpeed)."""

    @functools.wraps(save_pretrained)
    def save_perft_adapter(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None and _holds_perft_adapter(self) and _gathers(self, kwargs):
            kwargs["state_dict"] = gathered_adapter_state_dict(self)
        return save_pretrained(self, save_directory, *args, **kwargs)

    setattr(save_perft_adapter, _HOOKED, True)
    return save_perft_adapter


def _gathers(model: PeftModel, save_kwargs: dict[str, Any]) -> bool:
    """Whether this rank's save gathers the adapter. Under ZeRO-3 only a rank that writes does: the Trainer calls
    ``save_pretrained`` on the main process alone, and Accelerate's documented save passes the main process the
    state dict of ``accelerator.get_state_dict`` and the other ranks ``None`` with ``is_main_process=False``."""
    if any(is_zero3_partitioned(parameter) for parameter in model.parameters()):
        return save_kwargs.get("is_main_process", True)
    return is_distributed()


def _average_gradient(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)


def _unmanaged_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that are plain tensors, in a fixed order (the same on every rank)."""
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def _holds_perft_adapter(model: PeftModel) -> bool:
    from ..config import PerftConfig

    return any(isinstance(config, PerftConfig) for config in getattr(model, "peft_config", {}).values())


def _is_adapter_key(key: str) -> bool:
    return MODULES_TO_SAVE_MARKER in key or any(marker in f"{key}." for marker in ADAPTER_KEY_MARKERS)


EXPERT_PARALLEL_NAME = "perft"
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
        if block is None or not block._experts_call_adapters:
            return output
        off_rank = local_index >= self.num_local_experts
        index = local_index.masked_fill(off_rank, 0)
        for name in block._experts_call_adapters:
            lora_A, lora_B = block.perft_A[name], block.perft_B[name]
            if not isinstance(lora_A, DTensor):
                continue
            lora_A, lora_B = lora_A.to_local(), lora_B.to_local()
            config = block.perft_configs[name]
            adapter_weights = weights.masked_fill(off_rank, 0.0).to(lora_A.dtype)
            adapter_input = block._adapter_input(name, tokens)
            delta = block._routed(config, adapter_input, lora_A, lora_B, index, adapter_weights)
            output = add_scaled(output, delta.to(output.dtype), config.scaling)
        return output


def install_expert_parallel() -> None:
    """Register `PerftExpertParallel` with Transformers under the name ``"perft"`` (idempotent)."""
    EPImplementationInterface.register(EXPERT_PARALLEL_NAME, PerftExpertParallel)


def shard_adapter(block: nn.Module, adapter_name: str) -> None:
    """Lay a new adapter's tensors out as the engines shard its block: PERFT-E like the experts under expert
    parallelism (`PerftExpertParallel`), any variant on its bottleneck under tensor parallelism
    (`tensor_parallel`); replicated where neither applies."""
    variant = block.perft_configs[adapter_name].variant
    if variant == "E" and shard_routed_adapter(block, adapter_name):
        return
    if not split_over_tensor_parallel(block, adapter_name) and variant != "E":
        offer_token_slices(block)


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
        sharded = nn.Parameter(distribute_tensor(full.data, implementation.ep_mesh, [Shard(0)]))
        sharded.register_hook(functools.partial(_mean_over_batches, dp_size=distributed.dp_size))
        tensors[adapter_name] = sharded
    implementation.block = block
    return True


def _layout_sizes(distributed: Any) -> str:
    names = ("ep_size", "fsdp_size", "tp_size", "efsdp_size", "dp_replicate_size")
    return ", ".join(f"{name}={getattr(distributed, name)}" for name in names)


def distribute_like(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, as saved) laid out as ``reference``: this rank's shard when ``reference`` is a DTensor.

    Every rank loads the same file, so each takes its own shard without communication."""
    if not isinstance(reference, DTensor) or isinstance(tensor, DTensor):
        return tensor
    return distribute_tensor(tensor, reference.device_mesh, reference.placements, src_data_rank=None)


def distribute_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded adapter state dict with each tensor laid out as the model's (sharded PERFT-E tensors)."""
    own = model.state_dict()
    return {key: distribute_like(own[key], tensor) if key in own else tensor for key, tensor in state_dict.items()}


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
    if implementation is not None and implementation.tp_mesh.size() > 1:
        block.token_slice_terms = implementation.dispatch.all_to_all.token_slice_terms = TokenSliceTerms(block)


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
            config = block.perft_configs[name]
            lora = tuple(_ScaledGradient.apply(t, tp_size) for t in (block.perft_A[name], block.perft_B[name]))
            router_input = hidden_states if config.variant == "R" else input_rows
            delta = block._block_delta(
                name, router_input, input_rows, lora, lambda index, weight: (rows(index), rows(weight))
            )
            output = add_scaled(output, delta.to(output.dtype), config.scaling)
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
