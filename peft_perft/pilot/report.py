"""What a pilot run records and how it is shown: settings, per-configuration results, recommendation, table (the
plot is drawn by `pictures`).

``peft_perft.pilot`` trains and measures; this module only reads the numbers it produced. Keeping the two apart
lets the recommendation rules and the presentation be read, and changed, without the training machinery in view.
Everything here is re-exported by ``peft_perft.pilot``; import it from there.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft_perft.config import VARIANTS, PerftConfig
from peft_perft.workflow import BUNDLED_DATASET, BUNDLED_MODEL_DIR

from .pictures import draw_plot

CONFIG_NAMES = {
    "R": "PERFT-R",
    "E": "PERFT-E",
    "E_sel": "PERFT-E sel.",  # selective PERFT-E (pilot/selective.py)
    "D": "PERFT-D",
    "S": "PERFT-S",
    "lora": "LoRA-attn",
}
DEFAULT_CONFIGS = "R,E,D,S,lora"
ALWAYS_ACTIVE = {CONFIG_NAMES[variant] for variant in VARIANTS if not PerftConfig(variant=variant).is_routed}
SIGNIFICANT = 2.0
JSON_NAME = "pilot.json"
PLOT_NAME = "pilot.png"


@dataclass
class CandidateResult:
    """What one configuration measured; step times and per-example eval losses are kept for the noise estimates.

    ``train_loss`` is the loss TRL optimised (mean of the last fifth of the steps; it includes the MoE
    load-balancing term when the model has one), ``eval_loss`` the plain next-token loss on the held-out
    completions, ``tokens_per_example`` the mean length of the tokenised training examples.
    """

    name: str
    rank: int
    trainable_parameters: int
    steps: int
    step_seconds: list[float]
    tokens_per_second: float
    tokens_per_example: float
    peak_memory_mib: float
    train_loss: float
    eval_loss: float
    eval_loss_se: float
    eval_example_losses: list[float]
    accuracy: float | None = None
    accuracy_examples: int = 0
    accuracy_by_task: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    busiest_load: float | None = None

    @property
    def step_time(self) -> float:
        """Median seconds per optimizer step after the warm-up steps."""
        return statistics.median(self.step_seconds)

    @property
    def step_time_se(self) -> float:
        """Standard error of the mean step time: the timing noise the recommendation compares against."""
        if len(self.step_seconds) < 2:
            return 0.0
        return statistics.stdev(self.step_seconds) / math.sqrt(len(self.step_seconds))


@dataclass(frozen=True)
class PilotSettings:
    """Everything a pilot run depends on; the CLI flags map onto these fields one to one."""

    model: str = str(BUNDLED_MODEL_DIR)
    dataset: str = BUNDLED_DATASET
    configs: tuple[str, ...] = tuple(DEFAULT_CONFIGS.split(","))
    budget: int | None = None
    max_steps: int = 60
    timing_warmup_steps: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-3
    train_samples: int = 512
    eval_samples: int = 64
    test_files: tuple[str, ...] = ()
    test_samples: int = 20
    epochs: float = 3.0
    full_examples: int | None = None
    max_length: int = 512
    gradient_checkpointing: bool | None = None
    seed: int = 0
    output_dir: str = "pilot-output"
    quantize: str | None = None


@dataclass
class PilotReport:
    """The measured grid, the recommendation and the full-run estimates; what pilot.json holds."""

    settings: PilotSettings
    environment: dict[str, Any]
    budget: int
    results: list[CandidateResult]
    data_description: str
    full_examples: int
    recommendation: list[str] = field(default_factory=list)

    def full_run_estimate(self, result: CandidateResult) -> dict[str, float]:
        """Time for the whole training set over ``epochs`` at the measured throughput; memory as measured."""
        examples = self.full_examples * self.settings.epochs
        tokens = examples * result.tokens_per_example
        return {
            "examples": examples,
            "tokens": tokens,
            "optimizer_steps": math.ceil(examples / self.settings.batch_size),
            "seconds": tokens / result.tokens_per_second if result.tokens_per_second else math.inf,
            "peak_memory_mib": result.peak_memory_mib,
        }

    def to_dict(self) -> dict[str, Any]:
        results = []
        for result in self.results:
            entry = asdict(result)
            entry.update(
                step_time=result.step_time, step_time_se=result.step_time_se, full_run=self.full_run_estimate(result)
            )
            results.append(entry)
        return {
            "settings": asdict(self.settings),
            "environment": self.environment,
            "data": self.data_description,
            "budget": self.budget,
            "full_examples": self.full_examples,
            "results": results,
            "recommendation": self.recommendation,
        }

    def table(self) -> str:
        """The console table, one row per configuration."""
        memory = "peak GPU MiB" if self.environment["device"] == "cuda" else "peak RSS MiB"
        headers = ["config", "r", "trainable", "step ms", "tokens/s", memory, "train loss", "eval loss"]
        has_accuracy = any(result.accuracy is not None for result in self.results)
        headers += ["accuracy"] if has_accuracy else []
        headers += [f"full run ({self.settings.epochs:g} ep)"]
        rows = [headers]
        for result in self.results:
            row = [
                result.name,
                str(result.rank),
                f"{result.trainable_parameters:,}",
                f"{1000 * result.step_time:.0f} ± {1000 * result.step_time_se:.0f}",
                f"{result.tokens_per_second:,.0f}",
                f"{result.peak_memory_mib:,.0f}",
                f"{result.train_loss:.4f}",
                f"{result.eval_loss:.4f} ± {result.eval_loss_se:.4f}",
            ]
            if has_accuracy:
                row.append("-" if result.accuracy is None else f"{100 * result.accuracy:.1f}%")
            row.append(format_duration(self.full_run_estimate(result)["seconds"]))
            rows.append(row)
        widths = [max(len(row[column]) for row in rows) for column in range(len(headers))]
        lines = ["  ".join(_aligned(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def write(self, output_dir: str | Path) -> dict[str, Path]:
        """Write pilot.json and pilot.png; return their paths."""
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / JSON_NAME
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return {"json": json_path, "plot": draw_plot(self, directory / PLOT_NAME)}


def recommend(report: PilotReport) -> list[str]:
    """Which configuration wins on which axis, and whether the margin is larger than the measured noise."""
    results = report.results
    lines = [
        f"Recommendation ({report.settings.max_steps} steps, {len(results[0].eval_example_losses)} held-out examples):"
    ]
    if len(results) == 1:
        lines.append(f"  only {results[0].name} was measured; nothing to compare.")
    else:
        lines.append("  lowest eval loss: " + _quality_verdict(results))
        lines.append("  fastest step:     " + _speed_verdict(results, busy_machine_note(report)))
        if any(result.accuracy is not None for result in results):
            lines.append("  best accuracy:    " + _accuracy_verdict(results))
        smallest = min(results, key=lambda result: result.trainable_parameters)
        spread = max(r.trainable_parameters for r in results) / smallest.trainable_parameters - 1
        lines.append(
            f"  fewest parameters: {smallest.name} ({smallest.trainable_parameters:,}; the grid spans {spread:.0%} "
            f"above it around the {report.budget:,} budget)"
        )
    lines += _equivalence_notes(results)
    best = min(results, key=lambda result: result.eval_loss)
    estimate = report.full_run_estimate(best)
    lines.append(
        f"Full run of {best.name} here: {estimate['examples']:,.0f} examples ({report.full_examples:,} x "
        f"{report.settings.epochs:g} epochs, ~{estimate['tokens']:,.0f} tokens, {estimate['optimizer_steps']:,} steps "
        f"of {report.settings.batch_size}) at {best.tokens_per_second:,.0f} tokens/s = "
        f"{format_duration(estimate['seconds'])}, peak memory ~{estimate['peak_memory_mib']:,.0f} MiB "
        f"(at this batch size and max length)."
    )
    if busy_machine_note(report):
        lines.append("  (throughput measured while the CPU was shared: on an idle machine the run is shorter)")
    return lines


def _equivalence_notes(results: list[CandidateResult]) -> list[str]:
    """Name configurations that produced exactly the same held-out losses: they computed the same function.

    This is expected for PERFT-D and PERFT-S at one budget: N always-active experts of rank r, stacked, are one
    expert of rank N r, and from the same seed they start from the same weights.
    """
    groups: dict[tuple[float, ...], list[str]] = {}
    for result in results:
        groups.setdefault(tuple(result.eval_example_losses), []).append(result.name)
    notes = []
    for names in (names for names in groups.values() if len(names) > 1):
        why = " (always-active experts stacked are one wider expert)" if set(names) <= ALWAYS_ACTIVE else ""
        notes.append(
            f"  note: {' and '.join(names)} measured identical held-out losses; at this budget they are the same "
            f"model{why}, so compare them on speed only."
        )
    return notes


def _quality_verdict(results: list[CandidateResult]) -> str:
    """Best vs runner-up on held-out loss, with a paired standard error over the same examples."""
    best, second = sorted(results, key=lambda result: result.eval_loss)[:2]
    differences = [b - a for a, b in zip(best.eval_example_losses, second.eval_example_losses, strict=True)]
    margin = statistics.fmean(differences)
    error = standard_error(differences)
    verdict = margin_verdict(margin, error, "within noise: not distinguishable at this budget, run more steps")
    return (
        f"{best.name} ({best.eval_loss:.4f}) vs {second.name} ({second.eval_loss:.4f}): paired difference "
        f"{margin:.4f} ± {error:.4f} per example ({verdict})"
    )


def margin_verdict(gap: float, noise: float, noisy_words: str) -> str:
    """How a measured gap compares with its standard error; no gap at all is a tie, never a win."""
    if gap <= 0:
        return "a tie: no difference measured"
    if noise <= 0:
        return "clear: no noise measured"
    ratio = gap / noise
    return f"{ratio:.1f} SE, {'clear' if ratio >= SIGNIFICANT else noisy_words}"


def _speed_verdict(results: list[CandidateResult], busy: str | None) -> str:
    best, second = sorted(results, key=lambda result: result.step_time)[:2]
    gap = second.step_time - best.step_time
    noise = math.hypot(best.step_time_se, second.step_time_se)
    verdict = margin_verdict(gap, noise, "within timing noise")
    if busy:
        verdict = f"not trustworthy: {busy}"
    return (
        f"{best.name} ({1000 * best.step_time:.0f} ms) vs {second.name} ({1000 * second.step_time:.0f} ms): "
        f"{100 * gap / second.step_time:.0f}% faster ({verdict})"
    )


def busy_machine_note(report: PilotReport) -> str | None:
    """Why step times cannot be compared on a CPU that other processes were using, or None when it was free.

    Each configuration is timed in its own stretch of time, so load that comes and goes shifts whole
    configurations; the within-run noise estimate cannot see that.
    """
    cores = report.environment.get("cpu_cores")
    loads = [result.busiest_load for result in report.results if result.busiest_load is not None]
    if report.environment["device"] != "cpu" or not cores or not loads or max(loads) <= cores:
        return None
    return (
        f"other processes were using the CPU (load average up to {max(loads):.1f} on {cores} cores); "
        f"rerun on an idle machine to compare speed"
    )


def _accuracy_verdict(results: list[CandidateResult]) -> str:
    scored = sorted((r for r in results if r.accuracy is not None), key=lambda r: -r.accuracy)
    best = scored[0]
    error = math.sqrt(best.accuracy * (1 - best.accuracy) / max(1, best.accuracy_examples))
    if len(scored) == 1:
        return f"{best.name} {100 * best.accuracy:.1f}% ± {100 * error:.1f}"
    second = scored[1]
    second_error = math.sqrt(second.accuracy * (1 - second.accuracy) / max(1, second.accuracy_examples))
    verdict = margin_verdict(best.accuracy - second.accuracy, math.hypot(error, second_error), "within sampling noise")
    return (
        f"{best.name} {100 * best.accuracy:.1f}% vs {second.name} {100 * second.accuracy:.1f}% on "
        f"{best.accuracy_examples} examples (± {100 * error:.1f} / {100 * second_error:.1f} points; {verdict})"
    )


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _aligned(row: list[str], widths: list[int]) -> list[str]:
    """The first column left-aligned, the figures right-aligned."""
    return [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
