"""``peft-perft pilot``: measure PERFT variants and LoRA on your model and a slice of your data before a full run.

Each configuration of the grid (by default PERFT-R, -E, -D, -S and LoRA on the attention projections) gets a rank
chosen so that its trainable parameters come as close as possible to one shared budget, is trained with TRL's
``SFTTrainer`` for the same small number of steps on the same examples in the same order, and is measured: step
time, tokens per second, peak memory, training and held-out loss, and accuracy on LLM-Adapters test files when
given. The result is a console table, ``pilot.json``, ``pilot.png`` (quality against trainable parameters and
against step time), a recommendation that says how clear each winner is, and what the full run would cost here.

This module is the run itself and its command line. What a run records and how it is presented (settings, results,
recommendation, table, plot) lives in ``report``; the instruments that measure a configuration (step timer, peak
memory, held-out losses) live in ``measure``. Import the public names from ``peft_perft.pilot``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, set_seed
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from peft_perft.cli.inputs import InputError, require_dataset, require_model
from peft_perft.config import PerftConfig
from peft_perft.evaluation import EvaluationReport, GenerationSettings, evaluate, resolve_tasks
from peft_perft.quantization import add_quantize_argument
from peft_perft.workflow import (
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    bundled_task,
    datasets_progress_bars_off,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
)
from peft_perft.workflow import sft_config as shared_sft_config

from .measure import (
    PeakMemory,
    StepTimer,
    environment,
    held_out_losses,
    load_average,
    token_weighted,
)
from .report import (
    CONFIG_NAMES,
    DEFAULT_CONFIGS,
    CandidateResult,
    PilotReport,
    PilotSettings,
    recommend,
    standard_error,
)
from .selective import SELECTIVE_KEY, measure_selection, selective_config

REFERENCE_RANK = 8
ALPHA_PER_RANK = 2
BUNDLED_FULL_RUN_EXAMPLES = 10_000


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
class PilotData:
    train: Dataset
    eval: Dataset
    full_examples: int
    description: str


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
        help="recompute activations; auto: on a GPU only, as peft-perft demo",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the data order and every adapter's init"
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where pilot.json and pilot.png go")
    add_quantize_argument(parser)


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
        quantize=args.quantize,
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
    require_causal_lm(model_config, settings.model)
    lora_targets = attention_projection_names(model_config) if "lora" in settings.configs else []
    budget = settings.budget or count_trainable_parameters(model_config, perft_config("R", REFERENCE_RANK))
    data = load_pilot_data(settings)
    selection = measure_selection(settings, data.train, device, log) if SELECTIVE_KEY in settings.configs else None
    candidates = [match_budget(model_config, key, budget, lora_targets, selection) for key in settings.configs]
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


def require_causal_lm(model_config: PretrainedConfig, name: str) -> None:
    """The pilot trains text through the causal-LM class: refuse, before building anything, a model type that has
    none (an image-text-only or encoder-decoder MoE model), saying what trains it instead."""
    if type(model_config) not in AutoModelForCausalLM._model_mapping:
        raise InputError(
            f"--model {name} is a {model_config.model_type!r} model ({type(model_config).__name__}), which "
            f"Transformers has no causal-LM class for (an image-text-only or encoder-decoder model), and the pilot "
            f"trains text through AutoModelForCausalLM. Train an image-text MoE model with examples/vlm_perft.py "
            f"(peft-perft eval scores it on text tasks); an encoder-decoder one with your own seq2seq training loop."
        )


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
    require_model(settings.model)
    require_dataset(settings.dataset, builtin=(BUNDLED_DATASET,))
    for source in settings.test_files:
        if not Path(source).exists():
            require_dataset(source, flag="--test-files")
        try:
            resolve_tasks(None, source)
        except (ValueError, FileNotFoundError) as error:
            raise InputError(f"--test-files {source}: {error}") from None


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


def build_peft_config(key: str, rank: int, lora_targets: Sequence[str], selection: Any = None) -> PeftConfig:
    if key == SELECTIVE_KEY:
        return selective_config(selection, rank, ALPHA_PER_RANK)
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


def match_budget(
    model_config: PretrainedConfig, key: str, budget: int, lora_targets: Sequence[str], selection: Any = None
) -> Candidate:
    """The rank whose trainable parameters are closest to ``budget`` (at least 1).

    Parameters grow linearly with the rank (A and B are r x D and D x r; only PERFT-R's router does not grow), so
    the counts at r = 1 and r = 2 give the slope, and the chosen rank is counted again exactly.
    """
    at_one = count_trainable_parameters(model_config, build_peft_config(key, 1, lora_targets, selection))
    at_two = count_trainable_parameters(model_config, build_peft_config(key, 2, lora_targets, selection))
    per_rank = at_two - at_one
    rank = max(1, round((budget - (at_one - per_rank)) / per_rank))
    peft_config = build_peft_config(key, rank, lora_targets, selection)
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


def train_candidate(
    candidate: Candidate, settings: PilotSettings, data: PilotData, device: torch.device
) -> CandidateResult:
    """Train one configuration from the same seed and data order as the others, then measure it."""
    set_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    model = get_peft_model(load_base_model(settings.model, device, settings.quantize), candidate.peft_config)
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
    return shared_sft_config(
        Path(settings.output_dir),
        device,
        max_steps=settings.max_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        max_length=settings.max_length,
        checkpointing=checkpointing,
        per_device_eval_batch_size=settings.batch_size,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )


def test_accuracy(model: nn.Module, tokenizer: Any, settings: PilotSettings) -> EvaluationReport:
    """Accuracy on the LLM-Adapters test files with the paper's answer rules (peft_perft.evaluation)."""
    results = {}
    generation = GenerationSettings(batch_size=settings.batch_size)
    for source in settings.test_files:
        report = evaluate(model, tokenizer, source, settings=generation, max_samples=settings.test_samples)
        results.update(report.results)
    return EvaluationReport(results)
