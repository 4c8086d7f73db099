"""``peft-perft demo``: fine-tune a pretrained MoE with PERFT end to end and report what changed.

With no arguments it needs no network: it loads the small pretrained OLMoE shipped in
``peft_perft/demo/assets/demo-olmoe`` (made by ``scripts/train_demo_model.py``), measures its accuracy on the held-out
split of a bundled task it never saw (``peft_perft.workflow.bundled_tasks``), fine-tunes a PERFT adapter with TRL's
``SFTTrainer``, measures again, saves the adapter and reloads it with ``PeftModel.from_pretrained`` to check that
the logits match exactly, draws routing heatmaps and prints a short report (also written as ``report.json``).
``--model`` and ``--dataset`` run the same pipeline on any causal MoE LM and data set, e.g. on a GPU with
``--model allenai/OLMoE-1B-7B-0924 --dataset path/to/math_10k.json --eval-task gsm8k``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    PreTrainedTokenizerBase,
    set_seed,
)
from trl import SFTTrainer

from peft_perft.config import PerftConfig
from peft_perft.workflow import (
    ALL_TASKS,
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    DemoTask,
    answer_rule_scorer,
    bundled_task,
    datasets_progress_bars_off,
    exact_match_scorer,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
    sft_config,
)

from .checks import check_data_fits, texts_to_check, validate_demo_args
from .output import claim_output_dir
from .pictures import write_heatmaps
from .report import format_report, peak_memory_mb, perft_config_summary
from .scoring import check_reload, measure_accuracy
from .settings import DemoSettings

REPORT_FILE_NAME = "report.json"
ADAPTER_DIR_NAME = "adapter"


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo, print the report; exit status 1 when the reloaded adapter does not reproduce the logits."""
    report = run_demo(DemoSettings.from_args(args))
    print(format_report(report))
    return 0 if report["reload_check"]["passed"] else 1


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """The whole pipeline; returns the report that is also written to ``<output-dir>/report.json``.

    Every flag and the model and data names are checked first, before anything is loaded.
    """
    validate_demo_args(settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(settings.output_dir)
    with torch_threads(demo_threads(settings, device)), claim_output_dir(output_dir, settings.overwrite) as work:
        return _run_pipeline(settings, device, work)


def demo_threads(args: DemoSettings, device: torch.device) -> int | None:
    """Threads to run with: the flag, else one for the bundled model on a CPU, else None (torch decides)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: give a positive number of CPU threads.")
        return args.threads
    bundled = Path(args.model).resolve() == Path(BUNDLED_MODEL_DIR)
    return 1 if bundled and device.type == "cpu" else None


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_pipeline(args: DemoSettings, device: torch.device, output_dir: Path) -> dict[str, Any]:
    """Everything the demo does, writing into ``output_dir`` (the staging folder); the report names the paths the
    files will have once the finished folder is moved to ``--output-dir``."""
    started = time.perf_counter()
    set_seed(args.seed)
    final_dir = Path(args.output_dir).resolve()
    tokenizer = load_tokenizer(args.model)
    task = load_demo_task(args)
    if args.dataset != BUNDLED_DATASET:  # the bundled task is written in the bundled tokenizer's alphabet
        model_config = AutoConfig.from_pretrained(args.model)
        texts = texts_to_check(task.train, task.test)
        max_length = check_data_fits(texts, tokenizer, model_config, args, task.max_new_tokens)
        args = replace(args, max_length=max_length)
    model = load_base_model(args.model, device, args.quantize)
    print(f"[demo] {task.description}: {len(task.train)} training and {len(task.test)} held-out examples", flush=True)
    accuracy_before = measure_accuracy(model, tokenizer, task)
    print(f"[demo] base model accuracy on the held-out split: {accuracy_before[ALL_TASKS]:.1%}", flush=True)
    with datasets_progress_bars_off():
        trainer = build_trainer(model, tokenizer, task.train, args, output_dir, device)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    peft_model = inference_mode(trainer.model)
    accuracy_after = measure_accuracy(peft_model, tokenizer, task)
    adapter_dir = output_dir / ADAPTER_DIR_NAME
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    reload_check = check_reload(peft_model, args.model, adapter_dir, tokenizer, task.test, device, args.quantize)
    with datasets_progress_bars_off():
        heatmaps = write_heatmaps(peft_model, tokenizer, task.test, output_dir)
    report = {
        "command": args.command_line(),
        "seed": args.seed,
        "model": args.model,
        "dataset": args.dataset,
        "task": task.description,
        "perft_config": perft_config_summary(peft_model),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_examples": len(task.train),
        "test_examples": len(task.test),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "adapter_dir": str(final_dir / ADAPTER_DIR_NAME),
        "heatmaps": [str(final_dir / path.relative_to(output_dir)) for path in heatmaps],
        "reload_check": reload_check,
        "report_path": str(final_dir / REPORT_FILE_NAME),
    }
    (output_dir / REPORT_FILE_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def load_demo_task(args: DemoSettings) -> DemoTask:
    """The bundled task, or a user data set turned into prompt/completion splits with a held-out test split."""
    if args.dataset == BUNDLED_DATASET:
        # One fresh example per training row: the generator is cheap and repeats would invite memorisation.
        return bundled_task(args.steps * args.batch_size, args.max_eval_samples, args.seed, args.max_new_tokens)
    splits = load_user_splits(args.dataset, args.max_eval_samples, args.seed)
    scorer = answer_rule_scorer(args.eval_task) if args.eval_task else exact_match_scorer
    max_new_tokens = args.max_new_tokens or (256 if args.eval_task else 64)
    return DemoTask(splits["train"], splits["test"], scorer, max_new_tokens, f"data set {args.dataset}")


def perft_config_from_args(args: DemoSettings) -> PerftConfig:
    """The adapter the flags describe."""
    return PerftConfig(
        variant=args.variant, r=args.r, lora_alpha=args.lora_alpha, num_experts=args.num_experts, top_k=args.top_k
    )


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    args: DemoSettings,
    output_dir: Path,
    device: torch.device,
) -> SFTTrainer:
    """TRL's SFTTrainer with the PERFT adapter; completion-only loss, progress bar, no checkpoints."""
    config = sft_config(
        output_dir,
        device,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_length=args.max_length,
        # Recomputing activations saves memory a large model needs on a GPU and only costs time on a tiny one.
        checkpointing=device.type == "cuda",
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 5),
        report_to=args.report_to,
        disable_tqdm=False,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=train.select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
        peft_config=perft_config_from_args(args),
    )
