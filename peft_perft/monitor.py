"""Routing monitor: how tokens spread over the PERFT-R experts and the base model's experts, per adapted layer.

`RoutingMonitor` counts, on the device and inside forward hooks, the tokens each expert receives; it reads
the routing the model computed anyway (no extra forward, no second router call) and moves numbers to the host
only when asked (one transfer per read). `RoutingMonitorCallback` drives it from a `Trainer`: at every logging
step it adds the scalars to the Trainer's logs (so every ``report_to`` backend gets them), warns when a PERFT-R
router collapses, and writes layer x expert heatmaps at the end. `routing_report` gives the same figures for a
dataset, as data and pictures.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from .model import PerftModel
from .trace import (
    ROUTED_BY_OWN_ROUTER,
    AdaptedLayer,
    BaseRoutingTap,
    RoutingTrace,
    active_perft_adapters,
    find_adapted_layers,
    perft_routing,
    routing_trace,
)

logger = logging.getLogger(__name__)

BASE_ROUTER = "base"
PERFT_ROUTER = "perft"
REPORT_FILE_NAME = "routing_report.json"
# perft aux-loss sum and count, base aux-loss sum and count, forward passes
LOSS_SLOTS = 5

__all__ = [
    "CollapseCriteria",
    "RouterCollapseWarning",
    "RouterStats",
    "RoutingMonitor",
    "RoutingMonitorCallback",
    "RoutingReport",
    "RoutingTrace",
    "add_routing_monitor",
    "routing_report",
    "routing_trace",
]


class RouterCollapseWarning(UserWarning):
    """A PERFT-R router sends (almost) every token to the same experts, or leaves many experts unused."""


@dataclass
class RouterStats:
    """How one router of one adapted layer spread its tokens.

    ``load[i]`` is the fraction of tokens that expert ``i`` received (a token counts for each of its top-k
    experts, so the loads sum to top_k and a balanced router gives every expert top_k / num_experts).
    ``entropy`` is that distribution's entropy divided by log(num_experts): 1 is perfectly even, 0 a single
    expert. ``cv`` is the coefficient of variation of the loads (0 when even). ``drift`` (PERFT-R only) is
    ||W - W_start|| / ||W_start|| for the router weight W since monitoring began.
    """

    layer: int
    module: str
    router: str
    adapter: str | None
    num_experts: int
    top_k: int | None
    tokens: float
    load: list[float]
    entropy: float
    cv: float
    max_load: float
    dead_experts: list[int]
    drift: float | None = None

    @property
    def label(self) -> str:
        """Name of the router family in scalar keys and file names: ``base``, ``perft`` or ``perft_<adapter>``."""
        if self.router == BASE_ROUTER:
            return BASE_ROUTER
        return PERFT_ROUTER if self.adapter == "default" else f"{PERFT_ROUTER}_{self.adapter}"


@dataclass(frozen=True)
class CollapseCriteria:
    """When a PERFT-R router counts as collapsed in one logging window.

    ``max_load``: some expert receives at least this fraction of the tokens (ignored where top_k / num_experts,
    the balanced load, already reaches it). ``dead_fraction``: at least this fraction of experts got no token.
    A warning is raised once a router stays collapsed for ``patience`` consecutive logging windows.
    """

    max_load: float = 0.9
    dead_fraction: float = 0.5
    patience: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.max_load <= 1:
            raise ValueError(f"CollapseCriteria.max_load={self.max_load} must be in (0, 1].")
        if not 0 < self.dead_fraction <= 1:
            raise ValueError(f"CollapseCriteria.dead_fraction={self.dead_fraction} must be in (0, 1].")
        if self.patience < 1:
            raise ValueError(f"CollapseCriteria.patience={self.patience} must be at least 1.")

    def reason(self, stats: RouterStats) -> str | None:
        """Why ``stats`` shows a collapsed router, or None when it does not (or cannot collapse: top_k >= N)."""
        top_k = stats.top_k or 1
        if top_k >= stats.num_experts or stats.tokens == 0:
            return None
        reasons = []
        if stats.max_load >= self.max_load > top_k / stats.num_experts:
            busiest = stats.load.index(stats.max_load)
            reasons.append(f"expert {busiest} received {stats.max_load:.0%} of the tokens")
        if len(stats.dead_experts) / stats.num_experts >= self.dead_fraction:
            reasons.append(f"{len(stats.dead_experts)} of {stats.num_experts} experts received no token")
        return "; ".join(reasons) or None


@dataclass
class RoutingReport:
    """Routing statistics of every adapted layer over some forward passes; see `RouterStats` for the figures.

    ``perft_aux_loss`` is PERFT-R's weighted load-balancing loss (``router_aux_loss_coef`` times the Switch loss)
    averaged over the forward passes in which the model computed its own aux loss, which is when PERFT adds its
    own to the loss; ``base_aux_loss`` is the mean of the model output's ``aux_loss`` over the same passes.
    """

    routers: list[RouterStats] = field(default_factory=list)
    forward_passes: int = 0
    perft_aux_loss: float | None = None
    base_aux_loss: float | None = None

    @property
    def empty(self) -> bool:
        return not any(stats.tokens for stats in self.routers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: ``{"forward_passes", "perft_aux_loss", "base_aux_loss", "routers": [...]}``."""
        return {
            "forward_passes": self.forward_passes,
            "perft_aux_loss": self.perft_aux_loss,
            "base_aux_loss": self.base_aux_loss,
            "routers": [asdict(stats) for stats in self.routers],
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def scalars(self, per_layer: bool = False) -> dict[str, float]:
        """Flat scalars for a logger: per router family (``routing/base``, ``routing/perft``) the worst max load,
        mean entropy and cv, total dead experts and mean drift; with ``per_layer`` also each layer's figures."""
        scalars: dict[str, float] = {}
        if self.perft_aux_loss is not None:
            scalars["perft_aux_loss"] = self.perft_aux_loss
        for label, group in self._groups().items():
            prefix = f"routing/{label}"
            scalars[f"{prefix}/max_load"] = max(stats.max_load for stats in group)
            scalars[f"{prefix}/entropy"] = _mean(stats.entropy for stats in group)
            scalars[f"{prefix}/cv"] = _mean(stats.cv for stats in group)
            scalars[f"{prefix}/dead_experts"] = float(sum(len(stats.dead_experts) for stats in group))
            drifts = [stats.drift for stats in group if stats.drift is not None]
            if drifts:
                scalars[f"{prefix}/router_drift"] = _mean(drifts)
            if per_layer:
                for stats in group:
                    scalars.update(_layer_scalars(prefix, stats))
        return scalars

    def collapsed(self, criteria: CollapseCriteria | None = None) -> list[tuple[RouterStats, str]]:
        """PERFT-R routers that look collapsed in this report, with the reason (``patience`` is not applied)."""
        criteria = criteria or CollapseCriteria()
        found = []
        for stats in self.routers:
            reason = criteria.reason(stats) if stats.router == PERFT_ROUTER else None
            if reason is not None:
                found.append((stats, reason))
        return found

    def save_heatmaps(self, directory: str | Path) -> list[Path]:
        """One PNG per router family: layers x experts, coloured by the fraction of tokens each expert received."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [
            _draw_heatmap(label, group, directory / f"routing_{label}.png") for label, group in self._groups().items()
        ]

    def _groups(self) -> dict[str, list[RouterStats]]:
        groups: dict[str, list[RouterStats]] = {}
        for stats in self.routers:
            if stats.tokens:
                groups.setdefault(stats.label, []).append(stats)
        for group in groups.values():
            group.sort(key=lambda stats: stats.layer)
        return groups


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
        training_only: count only forward passes made in training mode (skip evaluation inside training).
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
        self._counters = self._plan_counters(track_base)
        self._aux_offset = sum(counter.num_experts + 1 for counter in self._counters)
        self._buffer = torch.zeros(self._aux_offset + LOSS_SLOTS, device=_device_of(self.layers[0].block))
        self._totals = torch.zeros_like(self._buffer, device="cpu", dtype=torch.float64)
        self._router_start: dict[tuple[str, str], torch.Tensor] = {}
        self._latest_drift: dict[tuple[str, str], float] = {}
        self._attention_mask: torch.Tensor | None = None
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
                if config.variant == ROUTED_BY_OWN_ROUTER:
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
        return self

    def detach(self) -> None:
        """Stop counting; what was counted stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tap is not None:
            self._tap.detach()

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
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    @torch.no_grad()
    def _count_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
        """Add this forward's routing to the device counts (no host synchronisation)."""
        if self.training_only and not module.training:
            return
        for counter in self._counters:
            routing = self._routing_of(counter)
            if routing is not None:
                self._add_counts(counter, *routing)
        self._add_losses(outputs)

    def _routing_of(self, counter: _Counter) -> tuple[torch.Tensor, torch.Tensor] | None:
        if counter.router == BASE_ROUTER:
            return self._tap.latest.pop(counter.layer.name, None) if self._tap is not None else None
        if counter.adapter not in active_perft_adapters(counter.layer):
            return None
        return perft_routing(counter.layer, counter.adapter)

    def _add_counts(self, counter: _Counter, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> None:
        buffer = self._buffer_on(expert_index.device)
        index = expert_index.reshape(expert_index.shape[0], -1).to(buffer.device)
        token_weight = self._token_weights(index.shape[0], buffer)
        per_choice = token_weight[:, None].expand_as(index)
        if counter.router == BASE_ROUTER:
            # Slots routed past the weighted experts (identity or skip experts) arrive as expert 0 with weight 0.
            per_choice = per_choice * (expert_weight.reshape(index.shape).to(buffer.device) != 0)
        per_choice = per_choice.reshape(-1)
        start = counter.offset
        buffer[start : start + counter.num_experts].index_add_(0, index.reshape(-1), per_choice)
        buffer[start + counter.num_experts : start + counter.num_experts + 1].add_(token_weight.sum())

    def _token_weights(self, num_tokens: int, buffer: torch.Tensor) -> torch.Tensor:
        """1 per real token and 0 per padding token, when the attention mask lines up with the routed tokens."""
        mask = self._attention_mask
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


def _layer_scalars(prefix: str, stats: RouterStats) -> dict[str, float]:
    scalars = {
        f"{prefix}/layer_{stats.layer}/max_load": stats.max_load,
        f"{prefix}/layer_{stats.layer}/entropy": stats.entropy,
        f"{prefix}/layer_{stats.layer}/cv": stats.cv,
        f"{prefix}/layer_{stats.layer}/dead_experts": float(len(stats.dead_experts)),
    }
    if stats.drift is not None:
        scalars[f"{prefix}/layer_{stats.layer}/router_drift"] = stats.drift
    return scalars


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


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


def _draw_heatmap(label: str, group: list[RouterStats], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [stats.load for stats in group]
    num_experts = group[0].num_experts
    balanced = (group[0].top_k or 1) / num_experts
    figure, axis = plt.subplots(figsize=(min(max(6.5, 2.5 + 0.35 * num_experts), 24), 1.8 + 0.4 * len(group)))
    highest = max(max(map(max, loads)), balanced)
    image = axis.imshow(loads, aspect="auto", cmap="viridis", vmin=0.0, vmax=highest)
    figure.colorbar(image, ax=axis, label="fraction of tokens")
    if num_experts * len(group) <= 256:
        for row, stats in enumerate(group):
            for column, value in enumerate(stats.load):
                color = "black" if value > 0.6 * highest else "white"
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    axis.set_title(f"{label} router: tokens per expert (balanced = {balanced:.2f})")
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_xticks(range(num_experts))
    axis.set_yticks(range(len(group)), [str(stats.layer) for stats in group])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class RoutingMonitorCallback(TrainerCallback):
    """Logs routing statistics with the Trainer's own reporting, warns on collapse, draws heatmaps at the end.

    Numbers are collected on the device by a `RoutingMonitor` during training forward passes and moved to the
    host once per logging step. They are added to the Trainer's ``logs`` (and its ``log_history``); backends of
    ``report_to`` see them when this callback runs before theirs, which `add_routing_monitor` arranges.

    Args:
        output_dir: where `on_train_end` writes heatmaps and ``routing_report.json``; default
            ``<args.output_dir>/routing``. None with ``save_at_end=False`` writes nothing.
        per_layer: also log every layer's figures (many scalars on large models).
        track_base: also monitor the base model's routing.
        criteria: when a PERFT-R router counts as collapsed.
        save_at_end: write the heatmaps and report when training ends (main process only).
    """

    def __init__(
        self,
        *,
        output_dir: str | Path | None = None,
        per_layer: bool = False,
        track_base: bool = True,
        criteria: CollapseCriteria | None = None,
        save_at_end: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.per_layer = per_layer
        self.track_base = track_base
        self.criteria = criteria or CollapseCriteria()
        self.save_at_end = save_at_end
        self.monitor: RoutingMonitor | None = None
        self.collapse_events: list[dict[str, Any]] = []
        self.saved_files: list[Path] = []
        self._streaks: dict[tuple[str | None, str], int] = {}
        self._final_report: RoutingReport | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if self.monitor is not None:
            self.monitor.detach()
        self.monitor = RoutingMonitor(
            model, track_base=self.track_base, training_only=True, reduce_across_processes=True
        ).attach()
        self._streaks.clear()
        self._final_report = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if self.monitor is None or logs is None or "loss" not in logs:
            return
        window = self.monitor.read()
        if window.empty:
            return
        added = {key: value for key, value in self._window_scalars(window).items() if key not in logs}
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        self._check_collapse(window, state)

    def _window_scalars(self, window: RoutingReport) -> dict[str, float]:
        scalars = window.scalars(self.per_layer)
        if window.base_aux_loss is not None:
            scalars["aux_loss"] = window.base_aux_loss
        return scalars

    def _check_collapse(self, window: RoutingReport, state: TrainerState) -> None:
        collapsed = {(stats.adapter, stats.module): reason for stats, reason in window.collapsed(self.criteria)}
        for stats in window.routers:
            key = (stats.adapter, stats.module)
            if stats.router != PERFT_ROUTER or not stats.tokens:
                continue
            self._streaks[key] = self._streaks.get(key, 0) + 1 if key in collapsed else 0
            if self._streaks[key] == self.criteria.patience:
                self._warn_collapse(stats, collapsed[key], state)

    def _warn_collapse(self, stats: RouterStats, reason: str, state: TrainerState) -> None:
        self.collapse_events.append(
            {
                "step": state.global_step,
                "layer": stats.layer,
                "module": stats.module,
                "adapter": stats.adapter,
                "reason": reason,
            }
        )
        if not state.is_world_process_zero:
            return
        message = (
            f"PERFT-R router of adapter {stats.adapter!r} in layer {stats.layer} ({stats.module}) has collapsed at "
            f"step {state.global_step}: {reason} over the last {self.criteria.patience} logging window(s). "
            f"Consider a larger router_aux_loss_coef, a lower learning rate, or fewer experts (num_experts)."
        )
        logger.warning(message)
        warnings.warn(message, RouterCollapseWarning, stacklevel=2)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.monitor is None:
            return
        self._final_report = self.monitor.report()
        self.monitor.detach()
        if self.save_at_end and state.is_world_process_zero:
            directory = self.output_dir or Path(args.output_dir) / "routing"
            self.saved_files = [*self._final_report.save_heatmaps(directory)]
            self.saved_files.append(self._final_report.save_json(directory / REPORT_FILE_NAME))

    def report(self) -> RoutingReport:
        """Statistics over the whole run so far (or the finished run), e.g. to inspect mid-training."""
        if self._final_report is not None:
            return self._final_report
        if self.monitor is None:
            raise RuntimeError("RoutingMonitorCallback.report() is only available once training has begun.")
        return self.monitor.report()

    def save_heatmaps(self, directory: str | Path) -> list[Path]:
        """Draw the heatmaps of the run so far on demand."""
        return self.report().save_heatmaps(directory)


def add_routing_monitor(trainer: Trainer, **options: Any) -> RoutingMonitorCallback:
    """Add a `RoutingMonitorCallback` to ``trainer`` ahead of the reporting callbacks, so that TensorBoard, W&B
    and the other ``report_to`` backends receive its scalars. Options are those of `RoutingMonitorCallback`."""
    callback = RoutingMonitorCallback(**options)
    callbacks = trainer.callback_handler.callbacks
    position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    callbacks.insert(position, callback)
    return callback


@torch.no_grad()
def routing_report(
    model: nn.Module,
    dataset_or_batches: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
) -> RoutingReport:
    """Routing statistics of ``model`` over a dataset, as data (`RoutingReport.to_dict`) and pictures.

    ``dataset_or_batches`` is a batch (a mapping with an ``input_ids`` tensor), an iterable of such batches
    (e.g. a DataLoader), or an iterable of examples: strings, or mappings with ``input_ids`` (a list) or with
    ``text`` / ``prompt`` (+ ``completion``) / ``messages`` (those need ``tokenizer``), e.g. a `datasets.Dataset`.
    The model runs in eval mode, its mode is restored afterwards. With ``output_dir`` the heatmaps and
    ``routing_report.json`` are written there.
    """
    if batch_size < 1:
        raise ValueError(f"routing_report: batch_size={batch_size} must be at least 1.")
    was_training = model.training
    device = next(model.parameters()).device
    monitor = RoutingMonitor(model, measure_drift=False)
    try:
        model.eval()
        with monitor:
            for batch in _batches(dataset_or_batches, tokenizer, batch_size, _pad_token_id(model, tokenizer)):
                model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False)
        report = monitor.report()
    finally:
        model.train(was_training)
    if output_dir is not None:
        report.save_heatmaps(output_dir)
        report.save_json(Path(output_dir) / REPORT_FILE_NAME)
    return report


def _batches(data: Any, tokenizer: Any, batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches (input_ids, attention_mask) from any of the inputs `routing_report` accepts."""
    if isinstance(data, Mapping) and isinstance(data.get("input_ids"), torch.Tensor):
        yield _model_inputs(data)
        return
    pending: list[list[int]] = []
    for item in data:
        if (
            isinstance(item, Mapping)
            and isinstance(item.get("input_ids"), torch.Tensor)
            and item["input_ids"].dim() == 2
        ):
            yield _model_inputs(item)
            continue
        pending.append(_example_ids(item, tokenizer))
        if len(pending) == batch_size:
            yield _padded(pending, pad_token_id)
            pending = []
    if pending:
        yield _padded(pending, pad_token_id)


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids) if mask is None else mask}


def _example_ids(item: Any, tokenizer: Any) -> list[int]:
    """Token ids of one example (fields that are missing or None, as in datasets with mixed rows, are skipped)."""
    fields = {key: value for key, value in item.items() if value is not None} if isinstance(item, Mapping) else {}
    if "input_ids" in fields:
        return [int(token) for token in fields["input_ids"]]
    if tokenizer is None:
        raise ValueError(
            "routing_report got text examples but no tokenizer: pass tokenizer=... or examples with 'input_ids'."
        )
    if isinstance(item, str):
        return tokenizer(item).input_ids
    if "messages" in fields:
        return list(tokenizer.apply_chat_template(fields["messages"], tokenize=True, return_dict=True)["input_ids"])
    if "text" in fields or "prompt" in fields:
        text = fields["text"] if "text" in fields else fields["prompt"] + fields.get("completion", "")
        return tokenizer(text).input_ids
    raise TypeError(
        f"routing_report cannot read an example of type {type(item).__name__}"
        f"{' with keys ' + str(sorted(item)) if isinstance(item, Mapping) else ''}: expected a string or a mapping "
        f"with 'input_ids', 'text', 'prompt' or 'messages'."
    )


def _padded(examples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_token_id(model: nn.Module, tokenizer: Any) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0
