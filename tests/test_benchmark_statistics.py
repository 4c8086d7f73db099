"""The paired statistic of benchmarks/olmoe_step.py against hand computations (no model is built)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import paired  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def test_paired_ratios_divide_repetition_by_repetition():
    # A slow stretch (repetition 2 takes twice as long for both) cancels out of the paired ratios.
    variant, frozen = [1.1, 2.2, 1.0], [1.0, 2.0, 1.0]
    assert paired.paired_ratios(variant, frozen) == pytest.approx([1.1, 1.1, 1.0])


def test_paired_ratios_need_one_reference_per_repetition():
    with pytest.raises(ValueError, match="one reference time per repetition"):
        paired.paired_ratios([1.0, 2.0], [1.0])


def test_interval_of_seven_is_min_to_max():
    # n = 7: [x(1), x(7)] covers the median with 1 - 2 / 2^7 = 0.984375; [x(2), x(6)] only with
    # 1 - 2 (1 + 7) / 2^7 = 0.875 < 0.95.
    values = [1.05, 0.98, 1.20, 1.01, 1.03, 0.99, 1.02]
    interval = paired.median_interval(values)
    assert (interval.median, interval.low, interval.high) == (1.02, 0.98, 1.20)
    assert interval.coverage == pytest.approx(0.984375)
    assert interval.count == 7


def test_interval_of_ten_drops_one_value_at_each_end():
    # n = 10: k = 2 gives 1 - 2 (1 + 10) / 1024 = 0.978515625; k = 3 gives 1 - 2 (1 + 10 + 45) / 1024 = 0.890625.
    values = [float(v) for v in (7, 3, 10, 1, 5, 9, 2, 8, 4, 6)]
    interval = paired.median_interval(values)
    assert (interval.median, interval.low, interval.high) == (5.5, 2.0, 9.0)
    assert interval.coverage == pytest.approx(0.978515625)


def test_too_few_values_give_min_to_max_and_say_their_lower_coverage():
    interval = paired.median_interval([1.0, 3.0, 2.0, 5.0, 4.0])
    assert (interval.median, interval.low, interval.high) == (3.0, 1.0, 5.0)
    assert interval.coverage == pytest.approx(1 - 2 / 32)


def test_verdicts_need_the_whole_interval_on_one_side():
    interval = paired.MedianInterval(median=1.03, low=1.01, high=1.06, coverage=0.98, count=7)
    assert paired.verdict_at_most(interval, 1.08) == "met"
    assert paired.verdict_at_most(interval, 1.00) == "missed"
    assert paired.verdict_at_most(interval, 1.04) == "undecided"
    assert paired.verdict_at_least(interval, 1.00) == "met"
    assert paired.verdict_at_least(interval, 1.10) == "missed"
    assert paired.verdict_at_least(interval, 1.04) == "undecided"


def test_no_verdict_from_four_repetitions():
    # n = 4: [min, max] covers the median with only 1 - 2 / 16 = 0.875.
    interval = paired.median_interval([1.10, 1.12, 1.11, 1.13])
    assert interval.coverage == pytest.approx(0.875)
    assert paired.verdict_at_most(interval, 1.04) == paired.TOO_FEW
    assert paired.verdict_at_least(interval, 1.0) == paired.TOO_FEW


def test_benchmark_targets_use_the_paired_ratios(tmp_path: Path):
    # Frozen alternates between slow and fast rounds; PERFT-E takes 1.05x frozen's time in every round, so every
    # paired ratio is 1.05 (met: <= 1.08) however slow the round. LoRA on the experts takes 2x PERFT-E's time in
    # every round (met: >= 1.8). PERFT-S's ratios, 0.99 to 1.05, straddle its 1.02 target (undecided).
    import json

    import olmoe_step

    frozen = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 2.0]
    perft_e = [1.05 * t for t in frozen]
    perft_s = [ratio * t for ratio, t in zip([0.99, 1.00, 1.01, 1.02, 1.03, 1.04, 1.05], frozen, strict=True)]
    times = {"frozen": frozen, "perft-e": perft_e, "perft-s": perft_s, "lora-experts": [2 * t for t in perft_e]}
    steps = {f"{name}|{protocol}": values for name, values in times.items() for protocol in olmoe_step.PROTOCOLS}
    rows = [
        {"variant": name, **{f"step_vs_frozen_{protocol}": 1.0 for protocol in olmoe_step.PROTOCOLS}} for name in times
    ]
    for row in rows:
        row.update({f"lora_experts_over_this_{protocol}": 1.0 for protocol in olmoe_step.PROTOCOLS})
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rows": rows, "raw_step_seconds": steps, "raw_decode_seconds_per_token": {}}))
    table = olmoe_step.reanalyse(run)
    assert "| perft-e step [ids] <= 1.08 | 1.050 [1.050, 1.050] | 0.984 | 1.000 | met |" in table
    assert "| lora-experts step / perft-e step [embeds] >= 1.8 | 2.000 [2.000, 2.000] | 0.984 | 1.000 | met |" in table
    assert "| perft-s step [embeds] <= 1.02 | 1.020 [0.990, 1.050] | 0.984 | 1.000 | undecided |" in table
