"""The routing pictures: layer x expert heatmaps of a `RoutingReport` and of a `ModalityLoad`, and the token x layer
grids of a `RoutingTrace`, readable from 4 to 256 experts and 60 layers. Every picture of the monitor is drawn here;
the other modules compute the figures and call in. matplotlib is imported only when a picture is drawn.

Every heatmap colours an expert's load relative to a perfectly balanced router, ``load / (top_k / num_experts)``,
on one fixed logarithmic scale (1/8x .. 8x, balanced in the middle). The scale therefore means the same for the base
router and a PERFT-R router with another expert count, in every picture; dead experts get the coldest colour. Titles
say which data and which window of forward passes the figures cover. Numbers are written into the cells only when
there are few enough of them to read.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .modality import IMAGE, TEXT
from .stats import BASE_ROUTER

if TYPE_CHECKING:
    from .modality import ModalityLoad
    from .stats import RouterStats, RoutingReport

RATIO_LIMIT = 8.0  # colour scale: 1/8x .. 8x the balanced load
MAX_ANNOTATED_CELLS = 256
MAX_TICKS = 32
COLORMAP = "RdBu_r"  # blue: fewer tokens than balanced, white: balanced, red: more
TRACE_COLOURMAP = "YlGnBu"  # the trace's share of the routing weight, 0..1: pale yellow to dark blue
TOKENS_PER_STRIP = 64
MAX_LAYER_TICKS = 30

TraceCell = tuple[int, int, int, float | None]
"""One cell of a trace panel: (layer, position, the token's top expert, that expert's share of the token's routing
weight; None where the weights do not sum to a positive number)."""


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
    plt = _pyplot()
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


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a picture is drawn, so that
    importing the monitor does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spaced(count: int, most: int = MAX_TICKS) -> list[int]:
    """Every index when there are at most ``most``, else about ``most`` evenly spaced ones."""
    step = max(1, math.ceil(count / most))
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


def draw_modality_load(
    load: ModalityLoad, path: str | Path, title: str, caption: str, modalities: Sequence[str] = (IMAGE, TEXT)
) -> Path:
    """One heatmap: a block of layer rows per modality, experts as columns, each row's label giving the layer's
    overlap between the first two modalities."""
    overlap = load.overlap(*modalities[:2])
    shares = load.shares()
    rows, labels = [], []
    for modality in modalities:
        for index, layer in enumerate(load.layers):
            rows.append(shares[load.modalities.index(modality), index].tolist())
            labels.append(f"{modality} L{layer} (overlap {overlap[index]:.2f})")
    mean = overlap.mean().item()
    caption = f"{caption} Mean {modalities[0]}/{modalities[1]} overlap over layers: {mean:.2f}."
    return draw_load_heatmap(
        title, labels, rows, load.top_k / load.num_experts, Path(path), caption, row_groups=len(modalities)
    )


def digit_colour(cell_rgba: tuple[float, ...]) -> str:
    """Black digits on light cells, white on dark ones (the colour map runs from pale yellow to dark blue): whichever
    contrasts more with the cell, by the WCAG relative luminance."""

    def linear(channel: float) -> float:
        return channel / 12.92 if channel <= 0.04045 else ((channel + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(channel) for channel in cell_rgba[:3])
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


def draw_routing_trace(
    panels: Sequence[tuple[str, Sequence[TraceCell]]],
    token_labels: Mapping[int, str],
    layers: Sequence[int],
    path: Path,
    example: int,
) -> Path:
    """Token x layer grids, one per router panel (`RoutingTrace.plot`): each cell names the token's top expert in
    that layer and is coloured by the share of the token's routing weight that expert got (one 0..1 scale for every
    panel). Long inputs wrap into several strips of at most `TOKENS_PER_STRIP` tokens, so cells stay readable at 60
    layers and 256 experts. ``token_labels`` maps every position to the text its column shows."""
    plt = _pyplot()
    positions = sorted(token_labels)
    strips = [positions[start : start + TOKENS_PER_STRIP] for start in range(0, len(positions), TOKENS_PER_STRIP)]
    cell_height = 0.28 if len(layers) <= 24 else 0.16
    strip_height = 1.2 + cell_height * len(layers)
    columns = max(len(strip) for strip in strips)
    figure, axes = plt.subplots(
        len(panels) * len(strips),
        1,
        figsize=(min(max(8.0, 2.5 + 0.42 * columns), 30.0), 0.8 + strip_height * len(panels) * len(strips)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for index, ((title, cells), strip) in enumerate((panel, strip) for panel in panels for strip in strips):
        axis = axes[index, 0]
        image = _draw_trace_strip(plt, axis, cells, list(layers), strip)
        axis.set_xticks(range(len(strip)), [token_labels[position] for position in strip], rotation=90, fontsize=7)
        part = f", tokens {strip[0]}-{strip[-1]}" if len(strips) > 1 else ""
        axis.set_title(
            f"{title}: top expert of each token in each layer, example {example}, "
            f"{len(positions)} tokens, layers {layers[0]}-{layers[-1]}{part}",
            fontsize=9,
        )
    figure.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="share of the token's routing weight")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _draw_trace_strip(plt: Any, axis: Any, cells: Sequence[TraceCell], layers: list[int], strip: list[int]) -> Any:
    """One panel's cells of the positions in ``strip``: the share as colour, the top expert written in; returns the
    image for the colour bar."""
    import numpy as np

    share = np.full((len(layers), len(strip)), np.nan)
    font = 6 if len(layers) <= 24 else 5
    row_of = {layer: row for row, layer in enumerate(layers)}
    column_of = {position: column for column, position in enumerate(strip)}
    for layer, position, expert, weight_share in cells:
        if position not in column_of:
            continue
        cell = (row_of[layer], column_of[position])
        share[cell] = np.nan if weight_share is None else weight_share
        colour = "black" if weight_share is None else digit_colour(plt.get_cmap(TRACE_COLOURMAP)(share[cell]))
        axis.text(cell[1], cell[0], str(expert), ha="center", va="center", fontsize=font, color=colour)
    image = axis.imshow(share, aspect="auto", cmap=TRACE_COLOURMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = _spaced(len(layers), MAX_LAYER_TICKS)
    axis.set_yticks(ticks, [str(layers[index]) for index in ticks], fontsize=7)
    axis.set_ylabel("layer")
    return image
