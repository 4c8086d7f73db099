"""What the routing monitor measures: how one router spread its tokens (`RouterStats`), when a PERFT-R router
counts as collapsed (`CollapseCriteria`), and the `RoutingReport` that gathers them for every adapted layer, with
its JSON file, logger scalars and layer x expert heatmaps.

Nothing here touches a model: `counting` fills these figures from the routing it counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BASE_ROUTER = "base"
PERFT_ROUTER = "perft"
REPORT_FILE_NAME = "routing_report.json"


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
    source: str | None = None  # which data and window the figures cover, e.g. "training, steps 1-800"

    @property
    def empty(self) -> bool:
        return not any(stats.tokens for stats in self.routers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: ``{"forward_passes", "perft_aux_loss", "base_aux_loss", "routers": [...]}``."""
        return {
            "source": self.source,
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
        """One PNG per router family: layers x experts, coloured by each expert's load relative to a balanced router
        on one scale shared by every picture (see `peft_perft.monitor.pictures`)."""
        from .pictures import draw_router_heatmap  # pictures reads this module's names

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [
            draw_router_heatmap(self, label, group, directory / f"routing_{label}.png")
            for label, group in self._groups().items()
        ]

    def _groups(self) -> dict[str, list[RouterStats]]:
        groups: dict[str, list[RouterStats]] = {}
        for stats in self.routers:
            if stats.tokens:
                groups.setdefault(stats.label, []).append(stats)
        for group in groups.values():
            group.sort(key=lambda stats: stats.layer)
        return groups


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
