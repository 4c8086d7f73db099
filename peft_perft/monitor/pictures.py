"""The routing pictures: layer x expert heatmaps of a `RoutingReport`, readable from 4 to 256 experts and 60 layers.

Every heatmap colours an expert's load relative to a perfectly balanced router, ``load / (top_k / num_experts)``,
on one fixed logarithmic scale (1/8x .. 8x, balanced in the middle). The scale therefore means the same for the base
router and a PERFT-R router with another expert count, in every picture; dead experts get the coldest colour. Titles
say which data and which window of forward passes the figures cover. Numbers are written into the cells only when
there are few enough of them to read.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import BASE_ROUTER

if TYPE_CHECKING:
    from .stats import RouterStats, RoutingReport

RATIO_LIMIT = 8.0  # colour scale: 1/8x .. 8x the balanced load
MAX_ANNOTATED_CELLS = 256
MAX_TICKS = 32
COLORMAP = "RdBu_r"  # blue: fewer tokens than balanced, white: balanced, red: more


def relative_loads(loads: Sequence[float], balanced: float) -> list[float]:
    """log2 of each load over the balanced load, clipped to the colour scale (dead experts at its cold end)."""
    floor = math.log2(1 / RATIO_LIMIT)
    ceiling = math.log2(RATIO_LIMIT)
    return [min(ceiling, max(floor, math.log2(load / balanced))) if load > 0 else floor for load in loads]


def draw_load_heatmap(
    title: str,
    row_labels: Sequence[str],
    loads: Sequence[Sequence[float]],
    balanced: float,
    path: Path,
    caption: str,
    row_groups: int = 1,
) -> Path:
    """Rows x experts on the shared relative scale; ``row_groups`` > 1 draws a line between consecutive groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_rows, num_experts = len(loads), len(loads[0])
    width = min(max(7.0, 2.8 + 0.32 * num_experts), 26.0)
    height = min(max(2.6, 1.9 + (0.36 if num_rows <= 24 else 0.2) * num_rows), 30.0)
    figure, axis = plt.subplots(figsize=(width, height), layout="constrained")
    matrix = [relative_loads(row, balanced) for row in loads]
    limit = math.log2(RATIO_LIMIT)
    image = axis.imshow(matrix, aspect="auto", cmap=COLORMAP, vmin=-limit, vmax=limit, interpolation="nearest")
    ticks = list(range(-int(limit), int(limit) + 1))
    colorbar = figure.colorbar(image, ax=axis, ticks=ticks, shrink=0.9)
    colorbar.ax.set_yticklabels([_ratio_label(tick) for tick in ticks])
    colorbar.set_label("tokens relative to a balanced router")
    if num_rows * num_experts <= MAX_ANNOTATED_CELLS:
        for row, values in enumerate(loads):
            for column, value in enumerate(values):
                strong = abs(matrix[row][column]) > 0.6 * limit
                axis.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if strong else "black",
                )
    if row_groups > 1:
        per_group = num_rows // row_groups
        for boundary in range(per_group, num_rows, per_group):
            axis.axhline(boundary - 0.5, color="black", linewidth=0.8)
    axis.set_xticks(_spaced(num_experts))
    axis.set_yticks(_spaced(num_rows), [row_labels[index] for index in _spaced(num_rows)], fontsize=8)
    axis.set_xlabel(f"expert (of {num_experts}; balanced load = {balanced:.3g} of the tokens each)")
    wrapped = textwrap.fill(caption, width=max(40, int(9 * width)))  # the axes get about 9 characters per inch
    axis.set_title(f"{title}\n{wrapped}", fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def report_caption(report: Any, group: Sequence[Any]) -> str:
    """Which data and window a heatmap covers: the report's source and its forward passes and tokens."""
    tokens = max(stats.tokens for stats in group)
    source = getattr(report, "source", None) or "the monitored forward passes"
    passes = f"{report.forward_passes:,} forward pass{'' if report.forward_passes == 1 else 'es'}"
    return f"{source}: {passes}, {tokens:,.0f} tokens per layer"


def _spaced(count: int) -> list[int]:
    """Every index when there are few, else about MAX_TICKS evenly spaced ones."""
    step = max(1, math.ceil(count / MAX_TICKS))
    return list(range(0, count, step))


def _ratio_label(exponent: int) -> str:
    if exponent == 0:
        return "balanced"
    return f"{2**exponent:g}x" if exponent > 0 else f"1/{2**-exponent:g}x"


def draw_router_heatmap(report: RoutingReport, label: str, group: list[RouterStats], path: Path) -> Path:
    """One router family's layers x experts picture (`RoutingReport.save_heatmaps`)."""
    router = "base model router" if label == BASE_ROUTER else f"PERFT-R router ({label})"
    top_k = group[0].top_k or 1
    return draw_load_heatmap(
        f"{router}: tokens per expert and layer (top-{top_k} of {group[0].num_experts})",
        [f"layer {stats.layer}" for stats in group],
        [stats.load for stats in group],
        top_k / group[0].num_experts,
        path,
        report_caption(report, group),
    )
