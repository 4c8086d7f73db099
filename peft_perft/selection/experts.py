"""`select_experts`: the experts a dataset's tokens go to, per MoE block, measured with the routing monitor."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model
from torch import nn

from ..config import PerftConfig
from ..monitor import RoutingReport, routing_report

BASE_ROUTER = "base"
DEFAULT_MASS = 0.8


@dataclass
class ExpertSelection:
    """Per MoE block (module name, as `PerftConfig.target_experts` keys it), the selected base experts (sorted) and
    every expert's load (fraction of the tokens routed to it, summing to the model's top-k); ``rule`` says how the
    experts were picked and on what data."""

    experts: dict[str, list[int]]
    loads: dict[str, list[float]]
    rule: str

    def config(self, **settings: Any) -> PerftConfig:
        """A selective PERFT-E config adapting exactly these experts, with the rule recorded (the model card prints
        it); ``settings`` are the other `PerftConfig` fields (r, lora_alpha, ...)."""
        return PerftConfig(variant="E", target_experts=self.experts, target_experts_source=self.rule, **settings)

    def covered_mass(self) -> dict[str, float]:
        """Per block, the share of its routing (token-to-expert assignments) that the selected experts receive."""
        return {block: _share(self.loads[block], experts) for block, experts in self.experts.items()}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


def select_experts(
    model: nn.Module,
    data: Any,
    *,
    mass: float | None = None,
    top_k: int | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    description: str | None = None,
) -> ExpertSelection:
    """Measure how ``data`` is routed by ``model``'s frozen routers and select per MoE block the fewest experts that
    receive ``mass`` of its routing (default 0.8), or its ``top_k`` most loaded experts.

    ``model`` is the base model (it is wrapped with a no-op PERFT adapter for the measurement and given back
    unchanged) or a PERFT `PeftModel` (its base routing is read; its adapters may change the routing of later
    layers). ``data`` is anything `peft_perft.monitor.routing_report` reads (batches, a DataLoader, strings or rows
    with ``tokenizer``). Ties go to the lower expert index."""
    if mass is not None and top_k is not None:
        raise ValueError(f"select_experts: give mass={mass!r} or top_k={top_k!r}, not both.")
    if top_k is None:
        mass = DEFAULT_MASS if mass is None else mass
    if top_k is None and not 0 < mass <= 1:
        raise ValueError(f"select_experts: mass={mass!r} must be in (0, 1] (the share of routing to cover).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"select_experts: top_k={top_k!r} must be at least 1.")
    report = _measure(model, data, tokenizer=tokenizer, batch_size=batch_size, description=description)
    loads = {stats.module: stats.load for stats in report.routers if stats.router == BASE_ROUTER}
    if not loads or report.empty:
        raise ValueError(
            "select_experts measured no base routing: the data held no token, or the model's MoE blocks do not "
            "expose their routing (PERFT-E is unavailable there too). Pass non-empty data for a model PERFT-E adapts."
        )
    if top_k is not None:
        experts = {block: top_experts(load, top_k) for block, load in loads.items()}
        rule = f"the {top_k} most loaded experts per MoE block"
    else:
        experts = {block: experts_carrying(load, mass) for block, load in loads.items()}
        rule = f"per MoE block the fewest experts receiving {mass:.0%} of the routing"
    return ExpertSelection(experts=experts, loads=loads, rule=f"{rule}, measured on {report.source}")


def experts_carrying(load: list[float], mass: float) -> list[int]:
    """The fewest experts whose loads reach ``mass`` of the total (most loaded first, ties to the lower index);
    none where nothing was routed."""
    total = sum(load)
    chosen, covered = [], 0.0
    for expert in _by_load(load):
        if covered >= mass * total * (1 - 1e-9):  # the tolerance absorbs the float sums of shares like 0.8
            break
        chosen.append(expert)
        covered += load[expert]
    return sorted(chosen)


def top_experts(load: list[float], count: int) -> list[int]:
    """The ``count`` most loaded experts (ties to the lower index)."""
    return sorted(_by_load(load)[:count])


def _by_load(load: list[float]) -> list[int]:
    return sorted(range(len(load)), key=lambda expert: (-load[expert], expert))


def _share(load: list[float], experts: list[int]) -> float:
    total = sum(load)
    return sum(load[expert] for expert in experts) / total if total else 0.0


def _measure(model: nn.Module, data: Any, **settings: Any) -> RoutingReport:
    """The routing report of ``data``; a base model gets a PERFT-S adapter with B = 0 for it (no change to any
    output), removed afterwards."""
    if isinstance(model, PeftModel):
        return routing_report(model, data, **settings)
    probe = get_peft_model(model, PerftConfig(variant="S", r=1))
    try:
        return routing_report(probe, data, **settings)
    finally:
        probe.unload()
