"""`RoutingMonitor`: counts, on the device and inside forward hooks, the tokens each expert of every adapted
layer receives, for the PERFT-R experts and the base model's experts.

It reads the routing the model computed anyway (no extra forward, no second router call) and moves numbers to
the host only when asked (one transfer per read), as a `RoutingReport`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..model import PerftModel
from .adapted_layers import AdaptedLayer, active_perft_adapters, find_adapted_layers
from .stats import BASE_ROUTER, PERFT_ROUTER, RouterStats, RoutingReport
from .trace import BaseRoutingTap, TokenGroupTap, perft_routing

# perft aux-loss sum and count, base aux-loss sum and count, forward passes
LOSS_SLOTS = 5


@dataclass(frozen=True)
class _Counter:
    """Where one router's counts live in the monitor's flat buffer: num_experts counts, then the token total."""

    layer: AdaptedLayer
    router: str
    adapter: str | None
    num_experts: int
    top_k: int | None
    offset: int


class RoutingMonitor:
    """Accumulates expert loads of every adapted layer on the device, from routing the model computes anyway.

    Two forward hooks on the whole model (one to see the attention mask, one to count once the forward has
    finished, so that gradient-checkpointing recomputation is not counted twice) and one on each frozen experts
    module (to see the base routing). Counting is a few ``index_add_`` on the device; `read` moves everything
    to the host at once. Use as a context manager or call `attach` / `detach`.

    Args:
        model: a PERFT model (a `PeftModel`, possibly wrapped for distributed training).
        track_base: also count the base model's own routing.
        training_only: count only the forward passes that train: in training mode with autograd on. Evaluation
            inside training is skipped, and so is generation inside RL trainers (TRL's GRPOTrainer generates
            without gradients while the model stays in training mode), whose tokens the update's own forward
            scores again.
        reduce_across_processes: sum the counts over all processes at each read (every rank must call `read`).
        measure_drift: take the PERFT-R router weights at `attach` as the reference for ``drift``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        track_base: bool = True,
        training_only: bool = False,
        reduce_across_processes: bool = False,
        measure_drift: bool = True,
    ) -> None:
        self.root, self.layers = find_adapted_layers(model)
        self._tuner = next((module for module in model.modules() if isinstance(module, PerftModel)), None)
        self.training_only = training_only
        self.reduce_across_processes = reduce_across_processes
        self.measure_drift = measure_drift
        self._tap = BaseRoutingTap(self.layers) if track_base else None
        self._groups = TokenGroupTap(self.root, self.layers)
        self._groups_that_ran: set[str] = set()
        self._counters = self._plan_counters(track_base)
        self._aux_offset = sum(counter.num_experts + 1 for counter in self._counters)
        self._buffer = torch.zeros(self._aux_offset + LOSS_SLOTS, device=_device_of(self.layers[0].block))
        self._totals = torch.zeros_like(self._buffer, device="cpu", dtype=torch.float64)
        self._router_start: dict[tuple[str, str], torch.Tensor] = {}
        self._latest_drift: dict[tuple[str, str], float] = {}
        self._attention_mask: torch.Tensor | None = None
        self._counting = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _plan_counters(self, track_base: bool) -> list[_Counter]:
        counters, offset = [], 0
        for layer in self.layers:
            spec = layer.block.spec
            routers = (
                [(BASE_ROUTER, None, spec.num_experts, spec.top_k)] if track_base and spec.experts_routable else []
            )
            for adapter in layer.block.perft_configs:
                config = layer.block.perft_configs[adapter]
                if config.has_own_router:
                    routers.append((PERFT_ROUTER, adapter, config.resolved_num_experts(0), config.resolved_top_k()))
            for router, adapter, num_experts, top_k in routers:
                counters.append(_Counter(layer, router, adapter, num_experts, top_k, offset))
                offset += num_experts + 1
        return counters

    def attach(self) -> RoutingMonitor:
        """Start counting (and take the routers' current weights as the reference for drift)."""
        if self._handles:
            return self
        if self.measure_drift:
            self.reset_router_reference()
        self._handles.append(self.root.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(self._count_forward, with_kwargs=True))
        if self._tap is not None:
            self._tap.attach()
        self._groups.attach()
        for layer in self.layers:
            if layer.name in self._groups.members:
                self._handles.append(layer.block.register_forward_pre_hook(partial(self._mark_ran, layer.name)))
        return self

    def detach(self) -> None:
        """Stop counting; what was counted stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tap is not None:
            self._tap.detach()
        self._groups.detach()

    def __enter__(self) -> RoutingMonitor:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    @torch.no_grad()
    def reset_router_reference(self) -> None:
        """Remember each PERFT-R router weight as it is now; drift is measured from here."""
        self._router_start.clear()
        for counter in self._counters:
            if counter.router == PERFT_ROUTER:
                weight = _full_weight(counter.layer.block.perft_router[counter.adapter])
                if weight is not None:
                    self._router_start[(counter.adapter, counter.layer.name)] = weight.detach().clone()

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Decided before the forward: the counting hook itself runs without gradients.
        self._counting = not self.training_only or (module.training and torch.is_grad_enabled())
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._groups_that_ran.clear()

    @torch.no_grad()
    def _count_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
        """Add this forward's routing to the device counts (no host synchronisation)."""
        if not self._counting:
            return
        for counter in self._counters:
            routing = self._routing_of(counter)
            if routing is not None:
                self._add_counts(counter, *routing)
        self._add_losses(outputs)

    def _mark_ran(self, name: str, module: nn.Module, args: tuple) -> None:
        self._groups_that_ran.add(name)

    def _routing_of(self, counter: _Counter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This forward's routing of the counter's router; None where its block did not run (an expert group that
        got no token keeps its previous forward's records, which must not count again)."""
        name = counter.layer.name
        if name in self._groups.members and name not in self._groups_that_ran:
            return None
        if counter.router == BASE_ROUTER:
            return self._tap.latest.pop(counter.layer.name, None) if self._tap is not None else None
        if counter.adapter not in active_perft_adapters(counter.layer):
            return None
        return perft_routing(counter.layer, counter.adapter)

    def _add_counts(self, counter: _Counter, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> None:
        buffer = self._buffer_on(expert_index.device)
        index = expert_index.reshape(expert_index.shape[0], -1).to(buffer.device)
        token_weight = self._token_weights(index.shape[0], buffer, counter.layer.name)
        per_choice = token_weight[:, None].expand_as(index)
        if counter.router == BASE_ROUTER:
            # Slots routed past the weighted experts (identity or skip experts) arrive as expert 0 with weight 0.
            per_choice = per_choice * (expert_weight.reshape(index.shape).to(buffer.device) != 0)
        per_choice = per_choice.reshape(-1)
        start = counter.offset
        buffer[start : start + counter.num_experts].index_add_(0, index.reshape(-1), per_choice)
        buffer[start + counter.num_experts : start + counter.num_experts + 1].add_(token_weight.sum())

    def _token_weights(self, num_tokens: int, buffer: torch.Tensor, layer_name: str) -> torch.Tensor:
        """1 per real token and 0 per padding token, when the attention mask lines up with the routed tokens (for
        an expert group, with the tokens the group received: selecting them reads the mask's size on the host)."""
        mask = self._attention_mask
        received = self._groups.masks.get(layer_name)
        if mask is not None and received is not None and mask.numel() == received.numel():
            mask = mask.reshape(-1)[received.to(mask.device)]
        if mask is None or mask.numel() != num_tokens:
            return torch.ones(num_tokens, device=buffer.device, dtype=buffer.dtype)
        return mask.reshape(-1).to(device=buffer.device, dtype=buffer.dtype)

    def _add_losses(self, outputs: Any) -> None:
        """Running sums of the base model's aux loss and of PERFT-R's weighted aux loss, which the model adds to
        its loss whenever it computes its own (recomputed here from the routing records, no extra forward)."""
        buffer, start = self._buffer, self._aux_offset
        base_aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
        if isinstance(base_aux, torch.Tensor):
            self._add_loss(start + 2, base_aux)
            perft_aux = self._tuner.router_aux_loss(self._attention_mask) if self._tuner is not None else None
            if perft_aux is not None:
                self._add_loss(start, perft_aux)
        buffer[start + LOSS_SLOTS - 1 :].add_(1.0)

    def _add_loss(self, slot: int, value: torch.Tensor) -> None:
        self._buffer[slot : slot + 1].add_(value.detach().float().to(self._buffer.device))
        self._buffer[slot + 1 : slot + 2].add_(1.0)

    def _buffer_on(self, device: torch.device) -> torch.Tensor:
        """The count buffer, moved once to the device the routing is on (the model may move after attach)."""
        if self._buffer.device != device:
            self._buffer = self._buffer.to(device)
        return self._buffer

    @torch.no_grad()
    def read(self) -> RoutingReport:
        """Statistics since the last read (one host transfer), which also go into the running totals."""
        drift_keys, drift_norms = self._drift_norms()
        size = self._buffer.numel()
        values = torch.cat([self._buffer.detach().double(), drift_norms.double().to(self._buffer.device)])
        self._buffer.zero_()
        if self.reduce_across_processes and _distributed():
            torch.distributed.all_reduce(values)
            values[size:] /= torch.distributed.get_world_size()
        values = values.cpu()
        self._totals += values[:size]
        self._latest_drift = dict(zip(drift_keys, values[size:].tolist(), strict=True))
        return self._report(values[:size])

    def report(self) -> RoutingReport:
        """Statistics over everything counted since `attach` (flushes the current window into the totals)."""
        self.read()
        return self._report(self._totals)

    def _drift_norms(self) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """||W - W_start|| / ||W_start|| of every PERFT-R router with a reference, as one device tensor."""
        keys, norms = [], []
        for key, start in self._router_start.items():
            adapter, layer_name = key
            block = next(layer.block for layer in self.layers if layer.name == layer_name)
            weight = _full_weight(block.perft_router[adapter])
            if weight is None or weight.shape != start.shape:
                continue
            distance = torch.linalg.vector_norm(weight.detach().float() - start.float())
            keys.append(key)
            norms.append(distance / torch.linalg.vector_norm(start.float()).clamp_min(1e-12))
        return keys, torch.stack(norms) if norms else torch.zeros(0)

    def _report(self, values: torch.Tensor) -> RoutingReport:
        routers = []
        for counter in self._counters:
            counts = values[counter.offset : counter.offset + counter.num_experts].tolist()
            tokens = float(values[counter.offset + counter.num_experts])
            drift = self._latest_drift.get((counter.adapter, counter.layer.name)) if counter.adapter else None
            routers.append(_router_stats(counter, counts, tokens, drift))
        perft_sum, perft_passes, base_sum, base_passes, passes = values[self._aux_offset :].tolist()
        return RoutingReport(
            routers=routers,
            forward_passes=int(passes),
            perft_aux_loss=perft_sum / perft_passes if perft_passes else None,
            base_aux_loss=base_sum / base_passes if base_passes else None,
        )


def _router_stats(counter: _Counter, counts: list[float], tokens: float, drift: float | None) -> RouterStats:
    total = sum(counts)
    load = [count / tokens if tokens else 0.0 for count in counts]
    share = [count / total for count in counts] if total else [0.0] * len(counts)
    entropy = -sum(p * math.log(p) for p in share if p > 0)
    mean_load = sum(load) / len(load)
    std_load = math.sqrt(sum((value - mean_load) ** 2 for value in load) / len(load))
    return RouterStats(
        layer=counter.layer.layer,
        module=counter.layer.name,
        router=counter.router,
        adapter=counter.adapter,
        num_experts=counter.num_experts,
        top_k=counter.top_k,
        tokens=tokens,
        load=load,
        entropy=entropy / math.log(len(counts)) if len(counts) > 1 else 1.0,
        cv=std_load / mean_load if mean_load else 0.0,
        max_load=max(load),
        dead_experts=[index for index, count in enumerate(counts) if count == 0] if tokens else [],
        drift=drift,
    )


def _device_of(block: nn.Module) -> torch.device:
    parameter = next(block.parameters(), None)
    return parameter.device if parameter is not None and parameter.device.type != "meta" else torch.device("cpu")


def _full_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The whole router weight: gathered when it is an FSDP2 DTensor; None when it is a ZeRO-3 placeholder."""
    if hasattr(weight, "full_tensor"):
        return weight.full_tensor()
    return weight if weight.numel() else None


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
