"""The PERFT tuner layer: a wrapper around one frozen MoE block that adds the adapter experts.

Per adapter the layer stores stacked tensors ``perft_A`` (N, r, D), ``perft_B`` (N, D, r) and, for PERFT-R,
``perft_router`` (N, D). R, D and S add their output to the block's output; E adds ``g_i dE_i(h)`` inside the
experts call (inside their grouped_mm dispatch where it can, see ``experts_dispatch``; else right after the experts'
forward or through a forward hook), so it uses exactly the indices and weights the base experts receive and never
runs the base router a second time. Where the experts' call does not carry the routing (Llama 4, JetMoE), a
hook on the base router reads it from the router's output and E is added to the block's output. Either way, an
active E adapter whose hook did not run during the block's forward is an error, never a silent no-op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from .architectures import MoeBlockSpec
from .config import PerftConfig
from .dispatch import add_scaled, always_on_experts, as_dtype, routed_experts
from .dispatch.in_experts import AdapterTerm
from .dispatch.in_experts import install as install_in_dispatch
from .dispatch.in_experts import uninstall as uninstall_in_dispatch
from .parallel import place as shard_adapter
from .parallel.token_slices import TokenSliceTerms


@dataclass
class RoutingRecord:
    """The routing an adapted block used in its last forward: what the aux loss and the monitor read.

    ``expert_index`` and ``expert_weight`` (T, K) are the experts each token went to; ``router_logits`` (T, N) are
    PERFT-R's router outputs (None for E, whose base router is frozen).
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    router_logits: torch.Tensor | None = None

    @property
    def router_probs(self) -> torch.Tensor | None:
        """PERFT-R's full softmax (T, N) in fp32, computed when read (by the aux loss), not on every decode step."""
        if self.router_logits is None:
            return None
        return torch.softmax(self.router_logits, dim=-1, dtype=torch.float32)


class PerftMoeBlock(nn.Module, BaseTunerLayer):
    """A frozen MoE block plus one or more PERFT adapters."""

    adapter_layer_names = ("perft_A", "perft_B", "perft_router")
    other_param_names = ("perft_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PerftConfig, spec: MoeBlockSpec) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.perft_A = nn.ParameterDict()
        self.perft_B = nn.ParameterDict()
        self.perft_router = nn.ParameterDict()
        self.perft_dropout = nn.ModuleDict()
        self.perft_configs: dict[str, PerftConfig] = {}
        self.routing_records: dict[str, RoutingRecord] = {}
        self._experts_call_adapters: list[str] = []
        self._base_routing_seen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._experts_hook_handle: RemovableHandle | None = None
        self.token_slice_terms: TokenSliceTerms | None = None  # set by parallel.place under TP with EP
        self.block_name = type(base_layer).__name__
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PerftConfig) -> None:
        """Create (or replace) the tensors of one adapter for this block."""
        if config.variant == "E" and not self.spec.experts_routable:
            raise ValueError(
                f"PERFT-E cannot adapt {type(self.base_layer).__name__}: {self.spec.why_not_routable}, so the "
                f"model's own routing cannot be reused. Use variant 'R', 'D' or 'S' for this model."
            )
        num_experts = config.resolved_num_experts(self.spec.num_experts)
        device = _device_of(self.base_layer)
        hidden, rank = self.spec.hidden_size, config.r
        self.perft_A[adapter_name] = nn.Parameter(torch.empty(num_experts, rank, hidden, device=device))
        self.perft_B[adapter_name] = nn.Parameter(torch.empty(num_experts, hidden, rank, device=device))
        if config.variant == "R":
            self.perft_router[adapter_name] = nn.Parameter(torch.empty(num_experts, hidden, device=device))
        self.perft_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.perft_configs[adapter_name] = config
        if config.variant == "E" and self._experts_hook_handle is None:
            self._experts_hook_handle = self._register_base_routing_hook()
        self.reset_parameters(adapter_name)
        shard_adapter(self, adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str) -> None:
        """A like LoRA's default (Kaiming-uniform per expert), B = 0, the router from a small normal."""
        config = self.perft_configs[adapter_name]
        for expert_A in self.perft_A[adapter_name]:
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.perft_B[adapter_name])
        else:
            for expert_B in self.perft_B[adapter_name]:
                nn.init.kaiming_uniform_(expert_B, a=math.sqrt(5))
        if adapter_name in self.perft_router:
            nn.init.normal_(self.perft_router[adapter_name], std=config.router_init_std)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PERFT cannot be merged: its experts sit beside the frozen ones and depend on routing."""
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Run the frozen block, with E adapters inside the experts call and R/D/S adapters added to its output."""
        active = [] if self.disable_adapters else [name for name in self.active_adapters if name in self.perft_A]
        self.routing_records.clear()
        routed_by_base = [name for name in active if self.perft_configs[name].variant == "E"]
        # R, D and S split over tensor-parallel ranks are added inside the experts' TP forward (see tensor_parallel).
        beside_block = [
            n for n in active if self.perft_configs[n].variant != "E" and not isinstance(self.perft_A[n], DTensor)
        ]
        # Under TP with EP the experts' dispatch may add them on this rank's token rows (parallel.token_slices):
        # offered to it, and those it did not take are added here after the base.
        slices = self.token_slice_terms if beside_block else None
        deltas = self._block_deltas(beside_block, hidden_states) if slices is None else []
        # Some blocks scale their input in place (Mixtral's router jitter); keep the adapters' input intact.
        base_input = hidden_states.clone() if beside_block and self.training else hidden_states
        if slices is not None:
            slices.offer(beside_block, base_input)
        output = self._run_base(routed_by_base, base_input, *args, **kwargs)
        if slices is not None:
            deltas = self._block_deltas(slices.left(), hidden_states)
        for delta, scaling in deltas:
            output = _add_to_primary(output, delta, scaling)
        return output

    def _block_deltas(self, names: list[str], hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """Each named R, D or S adapter's term on the block's (flattened) input, with the scaling to add it by."""
        if not names:
            return []
        flat = hidden_states.reshape(-1, self.spec.hidden_size)
        return [(self._block_delta(name, flat), self.perft_configs[name].scaling) for name in names]

    def _run_base(self, routed_by_base: list[str], hidden_states: torch.Tensor, *args, **kwargs):
        """Call the frozen block; its experts hook adds the E adapters named here, for this call only (or its router
        hook records the routing, and the E adapters are added to the block output here).

        The names go into a list kept for the module's life: a list update costs far less per decode step than
        setting a module attribute."""
        self._experts_call_adapters[:] = routed_by_base
        self._base_routing_seen.clear()
        try:
            output = self.base_layer(hidden_states, *args, **kwargs)
        finally:
            self._experts_call_adapters.clear()
        if routed_by_base and not self._base_routing_seen:
            raise RuntimeError(self._hook_did_not_run(routed_by_base))
        if routed_by_base and self.spec.routes_from_router:
            flat = hidden_states.reshape(-1, self.spec.hidden_size)
            output = self._add_router_routed_experts(routed_by_base, flat, output, *self._base_routing_seen[-1])
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

    def _add_router_routed_experts(
        self, adapter_names: list[str], flat: torch.Tensor, output, expert_index: torch.Tensor, weight: torch.Tensor
    ):
        """Add ``sum_k g_k dE_k(h)`` of the E adapters to the block output, with the routing its router returned."""
        for name in adapter_names:
            config, lora_A, lora_B = self.perft_configs[name], self.perft_A[name], self.perft_B[name]
            self.routing_records[name] = RoutingRecord(_detached(expert_index), _detached(weight))
            adapter_input = self._adapter_input(name, flat)
            delta = self._routed(config, adapter_input, lora_A, lora_B, expert_index, as_dtype(weight, lora_A.dtype))
            output = _add_to_primary(output, as_dtype(delta, flat.dtype), config.scaling)
        return output

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

    def _pending_in_dispatch(self) -> list[AdapterTerm]:
        """The E adapters the current experts call should add inside its grouped dispatch: none outside this
        block's forward, none where routing slots may point past the weighted experts, and all or none, since an
        adapter that names a dispatch backend (instead of ``auto``) goes through that backend."""
        names = self._experts_call_adapters
        if self.spec.has_skip_slots or any(self.perft_configs[n].dispatch_backend != "auto" for n in names):
            return []
        return [
            AdapterTerm(
                name=name,
                lora_A=self.perft_A[name],
                lora_B=self.perft_B[name],
                scaling=self.perft_configs[name].scaling,
                activation=_activation(self.perft_configs[name]),
                prepare_input=functools.partial(self._adapter_input, name),
            )
            for name in self._experts_call_adapters
        ]

    def _done_in_dispatch(self, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> None:
        """The experts' dispatch added the pending adapters: record their routing, leave nothing for the hook."""
        for name in self._experts_call_adapters:
            self.routing_records[name] = RoutingRecord(_detached(expert_index), _detached(expert_weight))
        self._experts_call_adapters.clear()
        self._base_routing_seen.append(None)

    def _block_delta(
        self,
        adapter_name: str,
        flat: torch.Tensor,
        adapter_flat: torch.Tensor | None = None,
        lora: tuple[torch.Tensor, torch.Tensor] | None = None,
        local_routing: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Output of an R, D or S adapter for flattened block inputs (T, D), before its scaling (which the
        addition to the block output applies, saving a kernel per block and token).

        Tensor parallelism computes one rank's share with the same code: ``lora`` is that rank's slice of the
        bottleneck (or the whole adapter on its token rows), ``adapter_flat`` the input the adapter experts read
        (``flat`` feeds the router), and ``local_routing`` maps the router's (indices, weights) to what they use
        (the weights' partial gradients summed over the ranks, or the rows of ``adapter_flat``)."""
        config = self.perft_configs[adapter_name]
        lora_A, lora_B = lora or (self.perft_A[adapter_name], self.perft_B[adapter_name])
        router_input = as_dtype(flat, lora_A.dtype)
        expert_input = router_input if adapter_flat is None else as_dtype(adapter_flat, lora_A.dtype)
        adapter_input = self._dropout(adapter_name, expert_input)
        if config.variant != "R":
            return as_dtype(always_on_experts(adapter_input, lora_A, lora_B, _activation(config)), flat.dtype)
        router_logits = as_dtype(F.linear(router_input, self.perft_router[adapter_name]), torch.float32)
        record = RoutingRecord(*_top_k_routing(router_logits, config), router_logits=router_logits)
        self.routing_records[adapter_name] = record
        expert_index, top_weight = record.expert_index, as_dtype(record.expert_weight, lora_A.dtype)
        if local_routing is not None:
            expert_index, top_weight = local_routing(expert_index, top_weight)
        delta = self._routed(config, adapter_input, lora_A, lora_B, expert_index, top_weight)
        return as_dtype(delta, flat.dtype)

    def _add_routed_experts(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        """Inside this block's forward, add ``sum_i g_i dE_i(h)`` of the pending E adapters with the routing the
        experts received, and mark them done; otherwise nothing. Called by the experts' wrapped forward, and as a
        forward hook (installed once) for experts whose forward could not be wrapped."""
        if not self._experts_call_adapters:
            return None
        hidden, expert_index, expert_weight = self.spec.read_experts_call(args, kwargs)
        total = output
        for name in self._experts_call_adapters:
            config, lora_A, lora_B = self.perft_configs[name], self.perft_A[name], self.perft_B[name]
            self.routing_records[name] = RoutingRecord(_detached(expert_index), _detached(expert_weight))
            if isinstance(lora_A, DTensor):  # sharded like the experts: added inside their expert-parallel dispatch
                continue
            adapter_input = self._adapter_input(name, hidden)
            weight = as_dtype(expert_weight, lora_A.dtype)
            delta = self._routed(config, adapter_input, lora_A, lora_B, expert_index, weight)
            total = add_scaled(total, as_dtype(delta, output.dtype).view(output.shape), config.scaling)
        self._experts_call_adapters.clear()
        self._base_routing_seen.append(None)
        return total

    def _adapter_input(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """An E adapter's input: the experts' hidden states in the adapter's dtype, with its dropout."""
        return self._dropout(adapter_name, as_dtype(hidden, self.perft_A[adapter_name].dtype))

    def _dropout(self, adapter_name: str, adapter_input: torch.Tensor) -> torch.Tensor:
        """The adapter's dropout, skipped outside training where it is the identity anyway."""
        return self.perft_dropout[adapter_name](adapter_input) if self.training else adapter_input

    @staticmethod
    def _routed(
        config: PerftConfig,
        adapter_input: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
    ) -> torch.Tensor:
        """Routed experts (unscaled) through the configured dispatch backend."""
        return routed_experts(
            adapter_input, lora_A, lora_B, expert_index, expert_weight, _activation(config), config.dispatch_backend
        )

    def __repr__(self) -> str:
        return "perft." + super().__repr__()


MERGE_ERROR = (
    "PERFT adapters cannot be merged into the base model: they are extra experts beside the frozen ones (routed "
    "by their own router for R, by the model's routing for E, always active for D and S), so no change of the "
    "frozen weights reproduces them. Keep the adapter separate (PeftModel.from_pretrained at inference), or use "
    "unload() to get the original model back without the adapter."
)


def _top_k_routing(router_logits: torch.Tensor, config: PerftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PERFT-R's (indices, weights) (T, K): the top-k experts by router probability, their probabilities
    renormalised to sum 1 (the softmax of their logits, as softmax is monotonic) or left as they are."""
    if config.normalize_top_k:
        top_logits, top_index = router_logits.topk(config.resolved_top_k(), dim=-1)
        return top_index, torch.softmax(top_logits, dim=-1)
    top_weight, top_index = torch.softmax(router_logits, dim=-1).topk(config.resolved_top_k(), dim=-1)
    return top_index, top_weight


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor cut from autograd for the routing records; itself where autograd does not track it (a decode
    step), which saves an op per block."""
    return tensor.detach() if tensor.requires_grad else tensor


def _activation(config: PerftConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return F.silu if config.adapter_type == "parallel_adapter" else None


def _add_to_primary(output, delta: torch.Tensor, scaling: float):
    """Add the scaled adapter output (T, D) to the block's hidden states, in the shape the block returns them
    ((B, S, D), or (T, D) as Llama 4 does), also when the block returns a tuple."""
    if isinstance(output, tuple):
        return (add_scaled(output[0], delta.view(output[0].shape), scaling), *output[1:])
    return add_scaled(output, delta.view(output.shape), scaling)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None and parameter.device.type != "meta" else torch.device("cpu")
