"""``peft-perft pilot``: measure PERFT variants and LoRA on your model and a slice of your data before a full run.

Each configuration of the grid (by default PERFT-R, -E, -D, -S and LoRA on the attention projections) gets a rank
chosen so that its trainable parameters come as close as possible to one shared budget, is trained with TRL's
``SFTTrainer`` for the same small number of steps on the same examples in the same order, and is measured: step
time, tokens per second, peak memory, training and held-out loss, and accuracy on LLM-Adapters test files when
given. The result is a console table, ``pilot.json``, ``pilot.png`` (quality against trainable parameters and
against step time), a recommendation that says how clear each winner is, and what the full run would cost here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from peft_perft import PerftConfig
from peft_perft.demo import (
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    bundled_task,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
)
from peft_perft.evaluation import EvaluationReport, GenerationSettings, evaluate

CONFIG_NAMES = {"R": "PERFT-R", "E": "PERFT-E", "D": "PERFT-D", "S": "PERFT-S", "lora": "LoRA-attn"}
DEFAULT_CONFIGS = "R,E,D,S,lora"
ALWAYS_ACTIVE = {CONFIG_NAMES["D"], CONFIG_NAMES["S"]}
REFERENCE_RANK = 8
ALPHA_PER_RANK = 2
SIGNIFICANT = 2.0
BUNDLED_FULL_RUN_EXAMPLES = 10_000
JSON_NAME = "pilot.json"
PLOT_NAME = "pilot.png"
IGNORED_LABEL = -100


@dataclass(frozen=True)
class Candidate:
    """One configuration of the grid, with the rank that brings it to the shared parameter budget."""

    key: str
    rank: int
    trainable_parameters: int
    peft_config: PeftConfig

    @property
    def name(self) -> str:
        return CONFIG_NAMES[self.key]


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


@dataclass
class PilotData:
    train: Dataset
    eval: Dataset
    full_examples: int
    description: str


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


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``peft-perft pilot``; the defaults run the bundled model and task in a few minutes on a CPU."""
    defaults = PilotSettings()
    parser.add_argument("--model", default=defaults.model, help="Hub id or local path (default: the bundled OLMoE)")
    parser.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="'bundled', a datasets name, or a local JSON/JSONL file of prompt/completion or LLM-Adapters records",
    )
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"comma-separated grid out of {', '.join(CONFIG_NAMES)}"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help=f"trainable parameters per configuration (default: those of PERFT-R with r={REFERENCE_RANK})",
    )
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps per configuration")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per step; use the full run's")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="constant; use the full run's peak rate"
    )
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples, help="training examples used")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples, help="held-out examples for loss")
    parser.add_argument(
        "--test-files", nargs="+", default=[], help="LLM-Adapters test.json files or folders: report accuracy"
    )
    parser.add_argument("--test-samples", type=int, default=defaults.test_samples, help="examples per test task")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="epochs of the full run to estimate")
    parser.add_argument(
        "--full-examples",
        type=int,
        default=None,
        help=f"training examples of the full run (default: the data set's; bundled: {BUNDLED_FULL_RUN_EXAMPLES:,})",
    )
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="truncate examples to this")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="recompute activations (auto: on a GPU only, as peft-perft demo)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output-dir", default=defaults.output_dir)


def run_cli(args: argparse.Namespace) -> int:
    """Run the pilot and print the table, the recommendation and where the files are."""
    settings = PilotSettings(
        model=args.model,
        dataset=args.dataset,
        configs=tuple(parse_config_keys(args.configs)),
        budget=args.budget,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        test_files=tuple(args.test_files),
        test_samples=args.test_samples,
        epochs=args.epochs,
        full_examples=args.full_examples,
        max_length=args.max_length,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
        seed=args.seed,
        output_dir=args.output_dir,
    )
    report = run_pilot(settings)
    paths = report.write(settings.output_dir)
    print()
    print(report.table())
    print()
    print("\n".join(report.recommendation))
    print(f"\nWrote {paths['json']} and {paths['plot']}")
    return 0


def run_pilot(settings: PilotSettings, log: Callable[[str], object] = print) -> PilotReport:
    """Train and measure every configuration of the grid; see the module docstring."""
    validate_settings(settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_config = AutoConfig.from_pretrained(settings.model)
    lora_targets = attention_projection_names(model_config) if "lora" in settings.configs else []
    budget = settings.budget or count_trainable_parameters(model_config, perft_config("R", REFERENCE_RANK))
    candidates = [match_budget(model_config, key, budget, lora_targets) for key in settings.configs]
    data = load_pilot_data(settings)
    log(f"[pilot] {settings.model}: {len(candidates)} configurations at ~{budget:,} trainable parameters")
    log(f"[pilot] {data.description}: {len(data.train)} training, {len(data.eval)} held-out examples")
    results = []
    for number, candidate in enumerate(candidates, start=1):
        log(
            f"[pilot] {number}/{len(candidates)} {candidate.name} r={candidate.rank} "
            f"({candidate.trainable_parameters:,} parameters): {settings.max_steps} steps"
        )
        results.append(train_candidate(candidate, settings, data, device))
        log(f"[pilot]     done in {results[-1].train_seconds:.1f} s, eval loss {results[-1].eval_loss:.4f}")
    report = PilotReport(settings, environment(device), budget, results, data.description, data.full_examples)
    report.recommendation = recommend(report)
    return report


def validate_settings(settings: PilotSettings) -> None:
    """Fail before any training on settings that cannot give a measurement."""
    if not settings.configs:
        raise ValueError(f"--configs is empty; pick from {', '.join(CONFIG_NAMES)}.")
    if settings.max_steps <= settings.timing_warmup_steps:
        raise ValueError(
            f"--max-steps {settings.max_steps} leaves no timed step after the {settings.timing_warmup_steps} "
            f"warm-up steps; use at least {settings.timing_warmup_steps + 2}."
        )
    for name in ("batch_size", "train_samples", "eval_samples", "test_samples", "max_length"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}.")
    if settings.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {settings.epochs}.")
    if not Path(settings.model).exists() and settings.model == str(BUNDLED_MODEL_DIR):
        raise FileNotFoundError(
            f"The bundled demo model is missing at {BUNDLED_MODEL_DIR}; pass --model, or recreate it with "
            f"python scripts/train_demo_model.py."
        )


def parse_config_keys(text: str) -> list[str]:
    """'R,E,lora' -> ['R', 'E', 'lora'], case-insensitive, duplicates dropped."""
    by_lower = {key.lower(): key for key in CONFIG_NAMES}
    keys = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.lower() not in by_lower:
            raise ValueError(f"Unknown configuration {item!r} in --configs {text!r}; choose from {list(CONFIG_NAMES)}.")
        keys.append(by_lower[item.lower()])
    return list(dict.fromkeys(keys))


def attention_projection_names(model_config: PretrainedConfig) -> list[str]:
    """Names of the linear layers inside the attention modules (q/k/v/o on most models): LoRA's targets."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    names = {
        name.rpartition(".")[2]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part in name.rpartition(".")[0] for part in ("attn", "attention"))
    }
    if not names:
        raise ValueError(
            f"Found no linear layer inside an attention module of this {model_config.model_type!r} model, so LoRA on "
            f"attention has no target; leave 'lora' out of --configs."
        )
    return sorted(names)


def perft_config(variant: str, rank: int) -> PerftConfig:
    """A PERFT variant at its default expert count; alpha = 2 r keeps the scaling of PerftConfig's defaults."""
    return PerftConfig(variant=variant, r=rank, lora_alpha=ALPHA_PER_RANK * rank, task_type="CAUSAL_LM")


def build_peft_config(key: str, rank: int, lora_targets: Sequence[str]) -> PeftConfig:
    if key == "lora":
        return LoraConfig(
            r=rank, lora_alpha=ALPHA_PER_RANK * rank, target_modules=list(lora_targets), task_type="CAUSAL_LM"
        )
    return perft_config(key, rank)


def count_trainable_parameters(model_config: PretrainedConfig, peft_config: PeftConfig) -> int:
    """Exact trainable parameters of ``peft_config`` on this architecture, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(model_config), peft_config)
    trainable, _ = model.get_nb_trainable_parameters()
    return trainable


def match_budget(model_config: PretrainedConfig, key: str, budget: int, lora_targets: Sequence[str]) -> Candidate:
    """The rank whose trainable parameters are closest to ``budget`` (at least 1).

    Parameters grow linearly with the rank (A and B are r x D and D x r; only PERFT-R's router does not grow), so
    the counts at r = 1 and r = 2 give the slope, and the chosen rank is counted again exactly.
    """
    at_one = count_trainable_parameters(model_config, build_peft_config(key, 1, lora_targets))
    at_two = count_trainable_parameters(model_config, build_peft_config(key, 2, lora_targets))
    per_rank = at_two - at_one
    rank = max(1, round((budget - (at_one - per_rank)) / per_rank))
    peft_config = build_peft_config(key, rank, lora_targets)
    return Candidate(key, rank, count_trainable_parameters(model_config, peft_config), peft_config)


def load_pilot_data(settings: PilotSettings) -> PilotData:
    """Training and held-out slices as prompt/completion records, and the size of the full training set."""
    if settings.dataset == BUNDLED_DATASET:
        task = bundled_task(settings.train_samples, settings.eval_samples, settings.seed)
        full = settings.full_examples or BUNDLED_FULL_RUN_EXAMPLES
        return PilotData(task.train, task.test, full, task.description)
    with datasets_progress_bars_off():
        splits = load_user_splits(settings.dataset, settings.eval_samples, settings.seed)
    train = splits["train"].shuffle(seed=settings.seed)
    train = train.select(range(min(settings.train_samples, len(train))))
    full = settings.full_examples or len(splits["train"])
    return PilotData(train, splits["test"], full, f"data set {settings.dataset}")


class StepTimer(TrainerCallback):
    """Wall time and input tokens of every optimizer step (GPU work is waited for, so the times are real)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._started = 0.0
        self._tokens_before = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self._started = time.perf_counter()
        self._tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self.seconds.append(time.perf_counter() - self._started)
        self.tokens.append(state.num_input_tokens_seen - self._tokens_before)


class PeakMemory:
    """Peak memory while a block runs: torch's allocator peak on a GPU, the sampled process RSS on a CPU."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


def train_candidate(
    candidate: Candidate, settings: PilotSettings, data: PilotData, device: torch.device
) -> CandidateResult:
    """Train one configuration from the same seed and data order as the others, then measure it."""
    set_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    model = get_peft_model(load_base_model(settings.model, device), candidate.peft_config)
    timer = StepTimer()
    with datasets_progress_bars_off():
        trainer = SFTTrainer(
            model=model,
            args=sft_config(settings, device),
            train_dataset=data.train.select_columns(["prompt", "completion"]),
            eval_dataset=data.eval.select_columns(["prompt", "completion"]),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    load_before = load_average()
    with PeakMemory(device) as memory:
        trainer.train()
    train_seconds = time.perf_counter() - started
    loads = [load for load in (load_before, load_average()) if load is not None]
    example_losses = held_out_losses(trainer)
    timed = slice(settings.timing_warmup_steps, None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    accuracy = test_accuracy(inference_mode(trainer.model), tokenizer, settings) if settings.test_files else None
    result = CandidateResult(
        name=candidate.name,
        rank=candidate.rank,
        trainable_parameters=candidate.trainable_parameters,
        steps=trainer.state.global_step,
        step_seconds=timer.seconds[timed],
        tokens_per_second=sum(timer.tokens[timed]) / sum(timer.seconds[timed]),
        tokens_per_example=statistics.fmean(len(ids) for ids in trainer.train_dataset["input_ids"]),
        peak_memory_mib=memory.mib,
        train_loss=statistics.fmean(losses[-max(1, len(losses) // 5) :]),
        eval_loss=token_weighted(example_losses),
        eval_loss_se=standard_error([mean for mean, _ in example_losses]),
        eval_example_losses=[mean for mean, _ in example_losses],
        train_seconds=train_seconds,
        busiest_load=max(loads) if loads else None,
    )
    if accuracy is not None:
        result.accuracy = accuracy.average
        result.accuracy_examples = sum(task.total for task in accuracy.results.values())
        result.accuracy_by_task = {name: task.accuracy for name, task in accuracy.results.items()}
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def sft_config(settings: PilotSettings, device: torch.device) -> SFTConfig:
    """Identical training settings for every configuration: constant learning rate, a log line per step."""
    checkpointing = (
        device.type == "cuda" if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    )
    return SFTConfig(
        output_dir=str(Path(settings.output_dir) / "trainer"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=settings.seed,
        max_length=settings.max_length,
        bf16=device.type == "cuda",
        gradient_checkpointing=checkpointing,
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


@torch.no_grad()
def held_out_losses(trainer: SFTTrainer) -> list[tuple[float, int]]:
    """Per held-out example: mean next-token loss over its completion tokens, and how many there were.

    The plain language-model loss (no load-balancing term), from TRL's own tokenisation and label masking, kept
    per example so that configurations can be compared example by example.
    """
    model = trainer.model
    was_training = model.training
    model.eval()
    per_example = []
    for batch in trainer.get_eval_dataloader():
        labels = batch["labels"].to(model.device)
        outputs = model(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            output_router_logits=False,
            use_cache=False,
        )
        targets = labels[:, 1:]
        token_losses = F.cross_entropy(
            outputs.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORED_LABEL, reduction="none"
        )
        counts = (targets != IGNORED_LABEL).sum(dim=1)
        sums = token_losses.sum(dim=1)
        per_example += [(s / c, int(c)) for s, c in zip(sums.tolist(), counts.tolist(), strict=True) if c > 0]
    model.train(was_training)
    return per_example


def token_weighted(example_losses: list[tuple[float, int]]) -> float:
    """Mean loss over every completion token of the held-out slice."""
    return sum(mean * count for mean, count in example_losses) / sum(count for _, count in example_losses)


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def test_accuracy(model: nn.Module, tokenizer: Any, settings: PilotSettings) -> EvaluationReport:
    """Accuracy on the LLM-Adapters test files with the paper's answer rules (peft_perft.evaluation)."""
    results = {}
    generation = GenerationSettings(batch_size=settings.batch_size)
    for source in settings.test_files:
        report = evaluate(model, tokenizer, source, settings=generation, max_samples=settings.test_samples)
        results.update(report.results)
    return EvaluationReport(results)


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
    ratio = margin / error if error else math.inf
    verdict = "clear" if ratio >= SIGNIFICANT else "within noise: not distinguishable at this budget, run more steps"
    return (
        f"{best.name} ({best.eval_loss:.4f}) vs {second.name} ({second.eval_loss:.4f}): paired difference "
        f"{margin:.4f} ± {error:.4f} per example ({ratio:.1f} SE, {verdict})"
    )


def _speed_verdict(results: list[CandidateResult], busy: str | None) -> str:
    best, second = sorted(results, key=lambda result: result.step_time)[:2]
    gap = second.step_time - best.step_time
    noise = math.hypot(best.step_time_se, second.step_time_se)
    ratio = gap / noise if noise else math.inf
    verdict = "clear" if ratio >= SIGNIFICANT else "within timing noise"
    if busy:
        verdict = f"not trustworthy: {busy}"
    return (
        f"{best.name} ({1000 * best.step_time:.0f} ms) vs {second.name} ({1000 * second.step_time:.0f} ms): "
        f"{100 * gap / second.step_time:.0f}% faster ({ratio:.1f} SE, {verdict})"
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
    ratio = (best.accuracy - second.accuracy) / (math.sqrt(2) * error) if error else math.inf
    verdict = "clear" if ratio >= SIGNIFICANT else "within sampling noise"
    return (
        f"{best.name} {100 * best.accuracy:.1f}% vs {second.name} {100 * second.accuracy:.1f}% on "
        f"{best.accuracy_examples} examples (± {100 * error:.1f} points each; {verdict})"
    )


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


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _aligned(row: list[str], widths: list[int]) -> list[str]:
    """The first column left-aligned, the figures right-aligned."""
    return [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]


def load_average() -> float | None:
    """The one-minute load average (runnable processes) where the system reports it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def datasets_progress_bars_off() -> Iterator[None]:
    """Hide the one-line bars of TRL's dataset preparation, which would bury the pilot's own lines."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
