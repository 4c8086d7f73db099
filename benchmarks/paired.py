"""Paired ratios of interleaved timings: their median, a distribution-free confidence interval, and a verdict.

A shared machine slows whole stretches of a run: the repetitions of one variant then scatter by more than the
few percent a target leaves, and a ratio of medians (or of minima) taken over different moments inherits that.
The benchmark interleaves its measurements, so repetition ``i`` of a variant and repetition ``i`` of the frozen
reference ran close together in time; their ratio cancels whatever slowed that stretch. The median of those
per-repetition ratios, with an interval from the order statistics (the sign-test interval for a median: it
assumes only that the ratios are independent, not any distribution), says whether a target is met, missed, or
not decidable from the run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95
MIN_COVERAGE = 0.9
"""Below this coverage (4 or fewer repetitions) no verdict is given: the interval says too little."""
TOO_FEW = "undecided (too few repetitions)"


@dataclass(frozen=True)
class MedianInterval:
    """The median of some values and an interval [low, high] that contains the true median with ``coverage``."""

    median: float
    low: float
    high: float
    coverage: float
    count: int


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """``numerator[i] / denominator[i]`` for every repetition ``i`` (both lists in repetition order)."""
    if len(numerator) != len(denominator):
        raise ValueError(
            f"Paired ratios need one reference time per repetition: got {len(numerator)} and {len(denominator)}."
        )
    return [top / bottom for top, bottom in zip(numerator, denominator, strict=True)]


def sign_test_coverage(count: int, rank: int) -> float:
    """Probability that the k-th smallest and k-th largest of ``count`` independent values (k = ``rank``,
    1-based) enclose their median: 1 - 2 P(B <= k - 1) for B ~ Binomial(count, 1/2)."""
    below = sum(math.comb(count, i) for i in range(rank)) / 2**count
    return 1 - 2 * below


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> MedianInterval:
    """Median and the narrowest order-statistic interval whose coverage reaches ``confidence``; with too few
    values to reach it (5 or fewer at 95%) the widest one, [min, max], and its lower coverage."""
    if not values:
        raise ValueError("No values: run at least one repetition.")
    ordered = sorted(values)
    count = len(ordered)
    rank = 1
    while rank < count // 2 and sign_test_coverage(count, rank + 1) >= confidence:
        rank += 1
    return MedianInterval(
        median=statistics.median(ordered),
        low=ordered[rank - 1],
        high=ordered[count - rank],
        coverage=sign_test_coverage(count, rank),
        count=count,
    )


def verdict_at_most(interval: MedianInterval, limit: float) -> str:
    """For a target "ratio <= limit": met if the whole interval is within it, missed if the whole interval
    exceeds it, undecided if the interval straddles it or has too little coverage."""
    if interval.coverage < MIN_COVERAGE:
        return TOO_FEW
    if interval.high <= limit:
        return "met"
    if interval.low > limit:
        return "missed"
    return "undecided"


def verdict_at_least(interval: MedianInterval, limit: float) -> str:
    """For a target "ratio >= limit", the mirror of ``verdict_at_most``."""
    if interval.coverage < MIN_COVERAGE:
        return TOO_FEW
    if interval.low >= limit:
        return "met"
    if interval.high < limit:
        return "missed"
    return "undecided"


def describe(interval: MedianInterval) -> str:
    """``1.023 [0.991, 1.060]``: the median and its interval, as the reports print them."""
    return f"{interval.median:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
