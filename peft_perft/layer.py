"""The PERFT tuner layer: a wrapper around one frozen MoE block that adds the adapter experts.

Per adapter the layer stores stacked tensors ``perft_A`` (N, r, D), ``perft_B`` (N, D, r) and, for PERFT-R,
``perft_router`` (N, D). R, D and S add their output to the block's output; E adds ``g_i dE_i(h)`` inside the
experts call (inside their grouped_mm dispatch where it can, see ``dispatch.in_experts``; else right after the
experts' forward or through a forward hook), so it uses exactly the indices and weights the base experts receive and
never runs the base router a second time. Where the experts' call does not carry the routing (Llama 4, JetMoE), a
hook on the base router reads it from the router's output and E is added to the block's output. Either way, an
active E adapter whose hook did not run during the block's forward is an error, never a silent no-op.

Each term is computed by `terms.adapter_delta`. This module knows nothing of sharding: `parallel.place` may hand
an adapter's term to a distributed layout (``term_owners``), which then computes it with the same function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Protocol

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import terms
from .architectures import WHOLE_SHAPE_ATTRIBUTE, MoeBlockSpec
from .config import PerftConfig
from .dispatch import RoutedFn
from .dispatch.in_experts import AdapterTerm
from .dispatch.in_experts import install as install_in_dispatch
from .dispatch.in_experts import uninstall as uninstall_in_dispatch
from .terms import AdapterTensors, LocalRouting, Record, Routing, RoutingRecord, add_term, detached


class SplitTerms(Protocol):
    """A layout that splits some of the block's R, D and S adapters over its ranks (TP on ``r``, or on the token
    rows under TP with EP): given their names and the block's input, the scaled sum of their whole terms, which the
    block adds to its output."""

    def __call__(self, names: list[str], hidden_states: torch.Tensor) -> torch.Tensor: ...


class PerftMoeBlock(nn.Module, BaseTunerLayer):
    """A frozen MoE block plus one or more PERFT adapters."""

    adapter_layer_names = ("perft_A", "perft_B", "perft_router")
    # per-adapter state beside the tensors: peft's delete_adapter drops an adapter's entry from each (as LoRA's r,
    # lora_alpha and scaling dicts), so nothing planned from the configs (the routing monitor) meets a deleted one,
    # and a later adapter of the same name is not taken for one a parallel layout split
    other_param_names = ("perft_dropout", "perft_expert_slots", "perft_configs", "term_owners")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PerftConfig,
        spec: MoeBlockSpec,
        block_name: str | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.perft_A = nn.ParameterDict()
        self.perft_B = nn.ParameterDict()
        self.perft_router = nn.ParameterDict()
        self.perft_dropout = nn.ModuleDict()
        # selective PERFT-E: per adapter, base expert -> its adapter expert's row, or the row count where it has none
        # (not saved: the config's target_experts rebuilds it, so plain peft loads the adapter as it is)
        self.perft_expert_slots = BufferDict(persistent=False)
        self.perft_configs: dict[str, PerftConfig] = {}
        self.routing_records: dict[str, RoutingRecord] = {}
        self._experts_call_adapters: list[str] = []
        self._base_routing_seen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._experts_hook_handle: RemovableHandle | None = None
        self.term_owners: dict[str, str] = {}  # adapter -> the parallel layout that adds its term (else: this block)
        self.split_terms: SplitTerms | None = None  # set by parallel.place where it splits R, D or S adapters
        # set by routing_replay.RoutingReplay while it records/replays: PERFT-R's top-k goes through it
        self.routing_replay: Callable | None = None
        self.block_name = block_name or type(base_layer).__name__
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PerftConfig) -> None:
        """Create (or replace) the tensors of one adapter for this block."""
        if config.follows_base_routing and not self.spec.experts_routable:
            raise ValueError(
                f"PERFT-E cannot adapt {type(self.base_layer).__name__}: {self.spec.why_not_routable}, so the "
                f"model's own routing cannot be reused. Use variant 'R', 'D' or 'S' for this model."
            )
        config = config.for_block(self.block_name)
        selected = config.experts_for(self.block_name) if config.variant == "E" else None
        num_experts = config.resolved_num_experts(self.spec.num_experts) if selected is None else len(selected)
        # peft's convention (as LoRA): the base weights' device, meta included, and floating dtype; peft then
        # upcasts bf16/fp16 adapters to fp32 unless get_peft_model(..., autocast_adapter_dtype=False).
        like_base = {"device": _device_of(self.base_layer), "dtype": _floating_dtype_of(self.base_layer)}
        hidden, rank = self.spec.hidden_size, config.r
        self.perft_A[adapter_name] = nn.Parameter(torch.empty(num_experts, rank, hidden, **like_base))
        self.perft_B[adapter_name] = nn.Parameter(torch.empty(num_experts, hidden, rank, **like_base))
        if config.has_own_router:
            self.perft_router[adapter_name] = nn.Parameter(torch.empty(num_experts, hidden, **like_base))
        self.perft_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.perft_configs[adapter_name] = config
        if adapter_name in self.perft_expert_slots:
            del self.perft_expert_slots[adapter_name]
        if config.follows_base_routing and self._experts_hook_handle is None:
            self._experts_hook_handle = self._register_base_routing_hook()
        self.reset_parameters(adapter_name)
        self.term_owners.pop(adapter_name, None)  # the block's until parallel.place hands it to a layout
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str | None = None) -> None:
        """A like LoRA's default (Kaiming-uniform per expert), B = 0, the router from a small normal; every adapter
        of the block when no name is given (what torch's meta-device recipe calls after ``to_empty``).

        The values are drawn whole in fp32 and rounded to the base weights' dtype, as LoRA's are, so a model
        materialised from meta and initialised here gets the adapter it would have got on a real device from the
        same random state, whatever dtype peft gave the adapter and however FSDP2 sharded it."""
        for name in [adapter_name] if adapter_name is not None else list(self.perft_A):
            config = self.perft_configs[name]
            lora_A, lora_B = _fp32_like(self.perft_A[name]), _fp32_like(self.perft_B[name])
            for expert_A in lora_A:
                nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(lora_B)
            else:
                for expert_B in lora_B:
                    nn.init.kaiming_uniform_(expert_B, a=math.sqrt(5))
            self._assign(self.perft_A[name], lora_A)
            self._assign(self.perft_B[name], lora_B)
            if name in self.perft_router:
                router = nn.init.normal_(_fp32_like(self.perft_router[name]), std=config.router_init_std)
                self._assign(self.perft_router[name], router)
            selected = config.experts_for(self.block_name) if config.variant == "E" else None
            if selected is not None:  # here too, as to_empty() leaves buffers uninitialised
                device = _device_of(self.base_layer)
                self.perft_expert_slots[name] = expert_slots(selected, self.spec.num_experts, device)

    def _assign(self, parameter: torch.Tensor, values: torch.Tensor) -> None:
        """Store whole fp32 values in a parameter, rounded through the base dtype; a sharded (DTensor) parameter
        keeps its own shard of rank 0's values (`local_shard`), so every rank holds the same adapter; so do a rank's
        rows of a selective PERFT-E adapter under expert parallelism."""
        values = values.to(_floating_dtype_of(self.base_layer)).to(parameter.dtype)
        if hasattr(parameter, "device_mesh"):  # a DTensor: the parallel code cuts this rank's shard
            values, parameter = PerftMoeBlock.local_shard(values, parameter), parameter.to_local()
        elif hasattr(parameter, WHOLE_SHAPE_ATTRIBUTE):  # a rank's rows: the parallel code cuts them
            values = PerftMoeBlock.local_shard(values, parameter)
        parameter.copy_(values)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PERFT cannot be merged: its experts sit beside the frozen ones and depend on routing."""
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Run the frozen block, with E adapters inside the experts call and R/D/S adapters added to its output."""
        active = self.active_perft_adapters()
        self.routing_records.clear()
        routed_by_base = [name for name in active if self.perft_configs[name].follows_base_routing]
        beside = [name for name in active if name not in routed_by_base]
        deltas = self._block_deltas([name for name in beside if name not in self.term_owners], hidden_states)
        split = [name for name in beside if name in self.term_owners]
        if split:  # split over the ranks of a parallel layout: their sum, added where one process adds them
            deltas.append((self.split_terms(split, hidden_states), 1.0))
        # Some blocks scale their input in place (Mixtral's router jitter); keep the adapters' input intact.
        base_input = hidden_states.clone() if beside and self.training else hidden_states
        output = self._run_base(routed_by_base, base_input, *args, **kwargs)
        for delta, scaling in deltas:
            output = add_term(output, delta, scaling)
        return output

    def active_perft_adapters(self) -> list[str]:
        """The adapters of this block that take part in its forward."""
        return [] if self.disable_adapters else [name for name in self.active_adapters if name in self.perft_A]

    def _block_deltas(self, names: list[str], hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """Each named R, D or S adapter's term on the block's (flattened) input, with the scaling to add it by."""
        if not names:
            return []
        flat = hidden_states.reshape(-1, self.spec.hidden_size)
        return [(self.adapter_term(name, flat), self.perft_configs[name].scaling) for name in names]

    def _run_base(self, routed_by_base: list[str], hidden_states: torch.Tensor, *args, **kwargs):
        """Call the frozen block; its experts hook adds the E adapters named here, for this call only (or its router
        hook records the routing, and the E adapters are added to the block output here).

        The names go into a list kept for the module's life: a list update costs far less per decode step than
        setting a module attribute. Without E adapters the hooks have nothing to do, and the block is called as is
        (no list updates per call, fewer guards in a compiled graph); the routing seen is dropped once used, so no
        call holds on to an earlier call's tensors."""
        if not routed_by_base:
            return self.base_layer(hidden_states, *args, **kwargs)
        self._experts_call_adapters[:] = routed_by_base
        self._base_routing_seen.clear()
        try:
            output = self.base_layer(hidden_states, *args, **kwargs)
        finally:
            self._experts_call_adapters.clear()
        if not self._base_routing_seen:
            raise RuntimeError(self._hook_did_not_run(routed_by_base))
        routing = self._base_routing_seen[-1]
        self._base_routing_seen.clear()
        if self.spec.routes_from_router:
            flat = hidden_states.reshape(-1, self.spec.hidden_size)
            output = self._add_routed_terms(routed_by_base, flat, routing, output)
        return output

    def _register_base_routing_hook(self) -> RemovableHandle:
        """The hook through which E adapters get the base routing: on the experts, or on the router where only
        the router's output carries the routing."""
        if self.spec.routes_from_router:
            router = self.base_layer.get_submodule(self.spec.router_name)
            return router.register_forward_hook(self._record_router_routing)
        return self._attach_to_experts()

    def _hook_did_not_run(self, adapter_names: list[str]) -> str:
        hooked = self.spec.router_name if self.spec.routes_from_router else self.spec.experts_name or "(the block)"
        return (
            f"PERFT-E adapter(s) {adapter_names} added nothing in block {self.block_name!r}: the forward hook on its "
            f"module {hooked!r} did not run during the block's forward, so the base routing never reached PERFT. The "
            f"block computes that module another way than through its forward (for example GPT-OSS with MXFP4 "
            f"experts calls experts.forward_routed). Use variant 'R', 'D' or 'S', or load the experts unquantized "
            f"(e.g. Mxfp4Config(dequantize=True))."
        )

    def _record_router_routing(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook on a base router whose output carries the routing: keep it for this block call."""
        if self._experts_call_adapters:
            self._base_routing_seen.append(self.spec.router_routing(output, self.spec.top_k))

    def _attach_to_experts(self) -> RemovableHandle:
        """Compute PERFT-E inside the experts' own grouped dispatch where they have one, with the forward hook as
        the fallback that adds whatever that dispatch did not (other implementations, experts without one)."""
        experts = self.spec.experts_module(self.base_layer)
        install_in_dispatch(experts, self._pending_in_dispatch, self._done_in_dispatch, self._add_routed_experts)
        return experts.register_forward_hook(self._add_routed_experts, with_kwargs=True)

    def remove_experts_hook(self) -> None:
        """Detach PERFT-E from the base experts (on unload, so the original block comes back clean)."""
        if self._experts_hook_handle is not None:
            self._experts_hook_handle.remove()
            self._experts_hook_handle = None
            uninstall_in_dispatch(self.spec.experts_module(self.base_layer))

    def routed_adapters_owned_by(self, owner: str) -> list[str]:
        """The E adapters the current experts call adds (none outside this block's forward) whose term the parallel
        layout ``owner`` computes inside that call."""
        return [name for name in self._experts_call_adapters if self.term_owners.get(name) == owner]

    def _pending_in_dispatch(self) -> list[AdapterTerm]:
        """The E adapters the current experts call should add inside its grouped dispatch: none outside this
        block's forward, none where routing slots may point past the weighted experts, and all or none, since an
        adapter that names a dispatch backend (instead of ``auto``) goes through that backend and one a parallel
        layout owns (``term_owners``: split over tensor-parallel ranks, say) through that layout."""
        names = self._experts_call_adapters
        if self.spec.has_skip_slots or any(
            self.perft_configs[n].dispatch_backend != "auto" or n in self.term_owners for n in names
        ):
            return []
        return [
            AdapterTerm(
                lora_A=self.perft_A[name],
                scaling=self.perft_configs[name].scaling,
                delta=functools.partial(self.adapter_term, name),
                expert_slots=self.selected_expert_slots(name),
            )
            for name in names
        ]

    def _done_in_dispatch(self) -> None:
        """The experts' dispatch added the pending adapters (and recorded their routing): leave nothing for the hook."""
        self._experts_call_adapters.clear()
        self._base_routing_seen.append(None)

    def _add_routed_experts(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        """Inside this block's forward, add ``sum_i g_i dE_i(h)`` of the pending E adapters with the routing the
        experts received, and mark them done; otherwise nothing. Called by the experts' wrapped forward, and as a
        forward hook (installed once) for experts whose forward could not be wrapped."""
        if not self._experts_call_adapters:
            return None
        hidden, expert_index, expert_weight = self.spec.read_experts_call(args, kwargs)
        total = self._add_routed_terms(self._experts_call_adapters, hidden, (expert_index, expert_weight), output)
        self._experts_call_adapters.clear()
        self._base_routing_seen.append(None)
        return total

    def _add_routed_terms(self, adapter_names: list[str], hidden: torch.Tensor, routing: Routing, output):
        """Add ``sum_k g_k dE_k(h)`` of the E adapters, with the base routing, to ``output`` (the experts' or the
        block's); one a parallel layout owns was added inside the experts call, only its routing is recorded."""
        for name in adapter_names:
            if name in self.term_owners:
                self.routing_records[name] = RoutingRecord(*(detached(tensor) for tensor in routing))
                continue
            output = add_term(
                output, self.adapter_term(name, hidden, routing=routing), self.perft_configs[name].scaling
            )
        return output

    def adapter_term(
        self,
        adapter_name: str,
        adapter_input: torch.Tensor,
        *,
        tensors: AdapterTensors | None = None,
        router_input: torch.Tensor | None = None,
        routing: Routing | None = None,
        local_routing: LocalRouting | None = None,
        experts: RoutedFn | None = None,
        record: Record | None = None,
        expert_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One adapter's unscaled term (`terms.adapter_delta`) with this block's tensors, dropout and routing
        records; a parallel layout passes its slices (``tensors``), its routing rows (``local_routing``), the
        selective PERFT-E rows of its own experts (``expert_slots``) and, where the block records the routing
        itself, ``record=terms.no_record``."""
        return terms.adapter_delta(
            self.perft_configs[adapter_name],
            tensors or self.adapter_tensors(adapter_name),
            adapter_input,
            dropout=self._dropout(adapter_name),
            record=record or functools.partial(self.routing_records.__setitem__, adapter_name),
            router_input=router_input,
            routing=routing,
            local_routing=local_routing,
            experts=experts,
            replay=None if self.routing_replay is None else functools.partial(self.routing_replay, self, adapter_name),
            expert_slots=self.selected_expert_slots(adapter_name) if expert_slots is None else expert_slots,
        )

    def adapter_tensors(self, adapter_name: str) -> AdapterTensors:
        """The adapter's stacked experts and router, as this block holds them (DTensors where a layout shards them)."""
        return AdapterTensors(
            self.perft_A[adapter_name], self.perft_B[adapter_name], self.perft_router.get(adapter_name)
        )

    def selected_expert_slots(self, adapter_name: str) -> torch.Tensor | None:
        """Selective PERFT-E's map from base experts to the adapter's rows (`expert_slots`); None: every expert."""
        # peft's BufferDict has no get()
        return self.perft_expert_slots[adapter_name] if adapter_name in self.perft_expert_slots else None  # noqa: SIM401

    def _dropout(self, adapter_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The adapter's dropout, skipped outside training where it is the identity anyway."""
        return self.perft_dropout[adapter_name] if self.training else _identity

    @staticmethod
    def local_shard(values: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
        """This rank's shard of whole ``values`` for a sharded (DTensor) parameter; `peft_perft.patches`
        puts the distributed implementation here, as this module imports nothing distributed."""
        raise RuntimeError(
            f"PERFT: cannot initialise a sharded ({type(parameter).__name__}) adapter parameter without "
            "peft_perft.parallel's hooks; import peft_perft (which installs them) instead of peft_perft.layer alone."
        )

    def __repr__(self) -> str:
        return "perft." + super().__repr__()


MERGE_ERROR = (
    "PERFT adapters cannot be merged into the base model: they are extra experts beside the frozen ones (routed "
    "by their own router for R, by the model's routing for E, always active for D and S), so no change of the "
    "frozen weights reproduces them. Keep the adapter separate (PeftModel.from_pretrained at inference), or use "
    "unload() to get the original model back without the adapter."
)


def expert_slots(selected: list[int], num_experts: int, device: torch.device) -> torch.Tensor:
    """Selective PERFT-E's map from the ``num_experts`` base experts to the rows of its stacked adapter experts:
    ``selected[i]`` -> ``i``, every other expert -> ``len(selected)`` (no row: it adds nothing)."""
    slots = torch.full((num_experts,), len(selected), dtype=torch.long, device=device)
    slots[torch.tensor(selected, dtype=torch.long, device=device)] = torch.arange(len(selected), device=device)
    return slots


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's weights, meta included: a model prepared on meta gets its adapter there, to be
    materialised with it (``to_empty``) and initialised by ``reset_parameters``."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _floating_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point weight (quantized experts store integers), else the default."""
    dtypes = (parameter.dtype for parameter in module.parameters() if parameter.dtype.is_floating_point)
    return next(dtypes, torch.get_default_dtype())


def _fp32_like(parameter: torch.Tensor) -> torch.Tensor:
    """An uninitialised fp32 tensor of the parameter's whole (unsharded) shape, on its (local) device."""
    shape = getattr(parameter, WHOLE_SHAPE_ATTRIBUTE, parameter.shape)
    return torch.empty(shape, dtype=torch.float32, device=parameter.device)
