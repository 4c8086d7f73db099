"""The routing-trace picture's expert numbers stay readable on every cell colour (black on pale, white on dark)."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb

from peft_perft.monitor.pictures import TRACE_COLOURMAP, digit_colour

matplotlib.use("Agg")


def contrast(first: tuple[float, ...], second: tuple[float, ...]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours, computed with matplotlib's own colour conversion as reference."""

    def luminance(colour: tuple[float, ...]) -> float:
        values = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
        return 0.2126 * values[0] + 0.7152 * values[1] + 0.0722 * values[2]

    light, dark = sorted([luminance(first), luminance(second)], reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_digits_contrast_with_every_cell_of_the_colour_map() -> None:
    colour_map = matplotlib.colormaps[TRACE_COLOURMAP]
    worst = min(contrast(colour_map(share), digit_colour(colour_map(share))) for share in np.linspace(0, 1, 101))
    assert worst >= 4.5  # WCAG AA for normal text; black on the darkest blue was 1.3 before
    assert digit_colour(colour_map(1.0)) == "white"
    assert digit_colour(colour_map(0.0)) == "black"
