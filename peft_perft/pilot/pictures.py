"""The pilot's picture: quality against trainable parameters and against step time, one marker per configuration.

It only reads a finished `PilotReport`; matplotlib is imported when a picture is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import CandidateResult, PilotReport


def draw_plot(report: PilotReport, path: Path) -> Path:
    """Quality against trainable parameters and against step time; accuracy in a second row when measured.

    Every configuration keeps one colour and marker in all panels; points that land on top of each other
    (PERFT-D and -S at one budget) share one label instead of printing over each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    results = report.results
    styles = {result.name: style for result, style in zip(results, _marker_styles(), strict=False)}
    quality = [("eval loss (lower is better)", results, lambda r: r.eval_loss, lambda r: r.eval_loss_se)]
    with_accuracy = [result for result in results if result.accuracy is not None]
    if with_accuracy:
        quality.append(("accuracy % (higher is better)", with_accuracy, _accuracy_percent, _accuracy_error))
    axes_x = [
        ("trainable parameters", lambda r: r.trainable_parameters, lambda r: 0.0),
        ("step time (ms, median ± SE)", lambda r: 1000 * r.step_time, lambda r: 1000 * r.step_time_se),
    ]
    figure, axes = plt.subplots(len(quality), 2, figsize=(12, 4.3 * len(quality) + 0.8), squeeze=False)
    for row, (y_label, subset, y_value, y_error) in enumerate(quality):
        for column, (x_label, x_value, x_error) in enumerate(axes_x):
            axis = axes[row][column]
            points = [(result.name, x_value(result), y_value(result)) for result in subset]
            for result, (name, x, y) in zip(subset, points, strict=True):
                axis.errorbar(x, y, xerr=x_error(result), yerr=y_error(result), capsize=4, **styles[name])
            axis.set_xlabel(x_label)
            axis.set_ylabel(y_label)
            _keep_readable_range(axis, [y for _, _, y in points], percent=y_label.startswith("accuracy"))
            axis.grid(alpha=0.3)
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
            _label_points(axis, points)
    handles = [Line2D([], [], **styles[result.name]) for result in results]
    labels = [f"{result.name} (r={result.rank}, {result.trainable_parameters:,} parameters)" for result in results]
    figure.legend(handles, labels, loc="lower center", ncol=min(len(results), 3), fontsize="small", frameon=False)
    figure.suptitle(
        f"peft-perft pilot: {Path(report.settings.model).name}, {report.settings.max_steps} steps per configuration, "
        f"budget ~{report.budget:,} trainable parameters (error bars: 1 standard error)"
    )
    figure.tight_layout(rect=(0, 0.09 / len(quality), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _keep_readable_range(axis: Any, values: list[float], percent: bool) -> None:
    """Values that (nearly) coincide get a range around them, not matplotlib's +-4% of zero; percentages stay in
    0..100."""
    low, high = min(values), max(values)
    if high - low > 1e-9 * max(1.0, abs(high)):
        if percent:
            bottom, top = axis.get_ylim()
            axis.set_ylim(max(bottom, -2.0), min(top, 102.0))
        return
    if percent:
        bottom = min(max(high - 5.0, -2.0), 92.0)  # a 10-point window inside -2..102 around the common value
        axis.set_ylim(bottom, bottom + 10.0)
    else:
        half_width = max(0.05 * abs(high), 0.05)
        axis.set_ylim(high - half_width, high + half_width)


def _marker_styles() -> Iterator[dict[str, Any]]:
    import matplotlib.pyplot as plt

    for color, marker in zip(plt.cm.tab10.colors, "os^Dv<>ph*", strict=False):
        yield {"color": color, "marker": marker, "markersize": 9, "linestyle": "none"}


def _accuracy_percent(result: CandidateResult) -> float:
    return 100 * result.accuracy


def _accuracy_error(result: CandidateResult) -> float:
    """Binomial standard error of the accuracy, in points."""
    return 100 * math.sqrt(result.accuracy * (1 - result.accuracy) / max(1, result.accuracy_examples))


def _label_points(axis: Any, points: list[tuple[str, float, float]], radius_pixels: float = 24) -> None:
    """Short tags (R, E, D, S, LoRA), one per cluster of points closer than ``radius_pixels`` on screen; tags of
    points in the right third go to their left so that they stay inside the axes."""
    axis.autoscale_view()
    screen = axis.transData.transform([(x, y) for _, x, y in points])
    clusters: list[list[int]] = []
    for index, position in enumerate(screen):
        home = next((c for c in clusters if math.dist(screen[c[0]], position) < radius_pixels), None)
        if home is None:
            clusters.append([index])
        else:
            home.append(index)
    left, right = axis.transAxes.transform([(0, 0), (1, 0)])[:, 0]
    for cluster in clusters:
        tag = " / ".join(_short_name(points[index][0]) for index in cluster)
        _, x, y = points[cluster[0]]
        on_right = screen[cluster[0]][0] > left + 2 * (right - left) / 3
        axis.annotate(
            tag,
            (x, y),
            textcoords="offset points",
            xytext=(-9, 7) if on_right else (9, 7),
            ha="right" if on_right else "left",
            fontsize="medium",
            fontweight="bold",
        )


def _short_name(name: str) -> str:
    """'PERFT-R' -> 'R', 'LoRA-attn' -> 'LoRA': tags small enough not to collide."""
    return name.removeprefix("PERFT-").removesuffix("-attn")
