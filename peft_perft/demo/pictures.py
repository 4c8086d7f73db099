"""The demo's routing pictures: the routing monitor's heatmaps over the held-out split, plus one row per sub-task.

Drawn with the monitor's shared relative-load scale (`peft_perft.monitor.draw_load_heatmap`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from peft_perft.monitor import draw_load_heatmap, routing_report

TASK_HEATMAP_NAME = "routing_by_task.png"


def write_heatmaps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test: Dataset, output_dir: Path
) -> list[Path]:
    """The routing monitor's layer x expert heatmaps over the held-out split, plus one per sub-task."""
    routing_dir = output_dir / "routing"
    description = f"held-out split ({len(test)} examples)"
    overall = routing_report(
        model, test, tokenizer=tokenizer, batch_size=32, output_dir=routing_dir, description=description
    )
    paths = sorted(routing_dir.glob("*.png"))
    task_names = sorted(set(test["task"]))
    if len(task_names) < 2 or overall.empty:
        return paths
    family = "perft" if any(stats.router == "perft" for stats in overall.routers) else "base"
    reports = {}
    for name in task_names:
        rows = test.select([index for index, row_task in enumerate(test["task"]) if row_task == name])
        reports[name] = routing_report(model, rows, tokenizer=tokenizer, batch_size=32)
    return [*paths, draw_task_heatmap(reports, family, description, output_dir / TASK_HEATMAP_NAME)]


def family_routers(report: Any, family: str) -> list[Any]:
    """The chosen router family's statistics, one per adapted layer, in layer order."""
    return sorted((stats for stats in report.routers if stats.router == family), key=lambda stats: stats.layer)


def draw_task_heatmap(reports: dict[str, Any], family: str, description: str, path: Path) -> Path:
    """Rows are (layer, sub-task), columns experts, on the routing monitor's shared relative-load scale."""

    per_task = {name: family_routers(report, family) for name, report in reports.items()}
    first = next(iter(per_task.values()))
    labels, loads = [], []
    for layer_index, stats in enumerate(first):
        for name, routers in per_task.items():
            labels.append(f"layer {stats.layer}  {name}")
            loads.append(routers[layer_index].load)
    router_name = "PERFT-R adapter router" if family == "perft" else "base model router"
    tokens = ", ".join(f"{name} {routers[0].tokens:,.0f}" for name, routers in per_task.items())
    return draw_load_heatmap(
        f"{router_name}: where each sub-task's tokens go (top-{first[0].top_k or 1} of {first[0].num_experts})",
        labels,
        loads,
        (first[0].top_k or 1) / first[0].num_experts,
        path,
        f"{description}, tokens per sub-task: {tokens}",
        row_groups=len(first),
    )
