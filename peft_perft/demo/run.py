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
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import (
    AutoConfig,
    GenerationConfig,
    PreTrainedTokenizerBase,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from peft_perft.config import PerftConfig
from peft_perft.evaluation import generate_batch
from peft_perft.layer import PerftMoeBlock
from peft_perft.quantization import add_quantize_argument
from peft_perft.workflow import (
    ALL_TASKS,
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    CHECKPOINTING_FIELD,
    DemoTask,
    answer_rule_scorer,
    bundled_task,
    datasets_progress_bars_off,
    exact_match_scorer,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
)

from .checks import check_data_fits, texts_to_check, validate_demo_args
from .output import claim_output_dir
from .pictures import write_heatmaps

REPORT_FILE_NAME = "report.json"
ADAPTER_DIR_NAME = "adapter"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``peft-perft demo``; the defaults reproduce the bundled demo on a CPU in under three minutes."""
    parser.add_argument("--variant", choices=["R", "E", "D", "S"], default="R", help="PERFT variant")
    parser.add_argument("--r", type=int, default=8, help="bottleneck rank of each adapter expert")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scaling numerator (scale alpha/r)")
    parser.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="adapter experts per block, R, D and S only (default: R 8, D 2, S 1)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="PERFT-R adapter experts per token (default 2)")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--batch-size", type=int, default=32, help="training examples per optimizer step")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("perft-demo-output"), help="where the adapter, heatmaps and report go"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output-dir that already holds files, once this run has finished (default: refuse it)",
    )
    parser.add_argument(
        "--model", default=str(BUNDLED_MODEL_DIR), help="Hub model id or local path (default: the bundled OLMoE)"
    )
    parser.add_argument(
        "--dataset",
        default=BUNDLED_DATASET,
        help="'bundled', a datasets name, or a local JSON/JSONL file with prompt/completion or LLM-Adapters "
        "instruction/input/output(/answer) records",
    )
    parser.add_argument(
        "--eval-task",
        default=None,
        help="score with this LLM-Adapters task's answer rule, e.g. gsm8k (default: exact match of the completion)",
    )
    parser.add_argument("--max-eval-samples", type=int, default=200, help="held-out examples to score")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation length when scoring (default: bundled task 10, --eval-task 256, other data 64)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="truncate training sequences to this many tokens (at most the context)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the adapter's init and training")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 for the bundled model, whose tiny matrices gain nothing from more; "
        "torch's own default otherwise)",
    )
    parser.add_argument("--report-to", default="none", help="Trainer logging backends, e.g. tensorboard or wandb")
    add_quantize_argument(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo, print the report; exit status 1 when the reloaded adapter does not reproduce the logits."""
    report = run_demo(args)
    print(format_report(report))
    return 0 if report["reload_check"]["passed"] else 1


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the report that is also written to ``<output-dir>/report.json``.

    Every flag and the model and data names are checked first, before anything is loaded.
    """
    validate_demo_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch_threads(demo_threads(args, device)), claim_output_dir(Path(args.output_dir), args.overwrite) as work:
        return _run_pipeline(args, device, work)


def demo_threads(args: argparse.Namespace, device: torch.device) -> int | None:
    """Threads to run with: the flag, else one for the bundled model on a CPU, else None (torch decides)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: give a positive number of CPU threads.")
        return args.threads
    bundled = Path(args.model).resolve() == Path(BUNDLED_MODEL_DIR)
    return 1 if bundled and device.type == "cpu" else None


def reproducing_command(args: argparse.Namespace) -> str:
    """The ``peft-perft demo`` command line that repeats this run: every flag with the value it had (defaults too)."""
    words = ["peft-perft", "demo"]
    for name, value in vars(args).items():
        if name == "command" or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


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


def _run_pipeline(args: argparse.Namespace, device: torch.device, output_dir: Path) -> dict[str, Any]:
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
        args = argparse.Namespace(**{**vars(args), "max_length": max_length})
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
        "command": reproducing_command(args),
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


def load_demo_task(args: argparse.Namespace) -> DemoTask:
    """The bundled task, or a user data set turned into prompt/completion splits with a held-out test split."""
    if args.dataset == BUNDLED_DATASET:
        # One fresh example per training row: the generator is cheap and repeats would invite memorisation.
        return bundled_task(args.steps * args.batch_size, args.max_eval_samples, args.seed, args.max_new_tokens)
    splits = load_user_splits(args.dataset, args.max_eval_samples, args.seed)
    scorer = answer_rule_scorer(args.eval_task) if args.eval_task else exact_match_scorer
    max_new_tokens = args.max_new_tokens or (256 if args.eval_task else 64)
    return DemoTask(splits["train"], splits["test"], scorer, max_new_tokens, f"data set {args.dataset}")


@torch.no_grad()
def measure_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: DemoTask, batch_size: int = 64
) -> dict[str, float]:
    """Greedy-generation accuracy on the held-out split: overall (key ``all``) and per sub-task."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=task.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    rows = list(task.test)
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        generated = generate_batch(model, tokenizer, [row["prompt"] for row in batch], config)
        for row, text in zip(batch, generated, strict=True):
            correct = task.scorer(text, row)
            hits.setdefault(row.get("task", ALL_TASKS), []).append(correct)
            if row.get("task", ALL_TASKS) != ALL_TASKS:
                hits.setdefault(ALL_TASKS, []).append(correct)
    return {name: sum(values) / len(values) for name, values in sorted(hits.items())}


def perft_config_from_args(args: argparse.Namespace) -> PerftConfig:
    """The adapter the flags describe."""
    return PerftConfig(
        variant=args.variant, r=args.r, lora_alpha=args.lora_alpha, num_experts=args.num_experts, top_k=args.top_k
    )


def perft_config_summary(peft_model: PeftModel) -> dict[str, Any]:
    """The adapter hyper-parameters as applied: expert count and top-k resolved against the model."""
    config = peft_model.peft_config["default"]
    block = next(module for module in peft_model.modules() if isinstance(module, PerftMoeBlock))
    top_k = config.routed_top_k(block.spec.top_k)
    return {
        "variant": config.variant,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "num_experts": block.perft_A["default"].shape[0],
        "top_k": top_k,
        "adapted_blocks": sum(isinstance(module, PerftMoeBlock) for module in peft_model.modules()),
    }


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    args: argparse.Namespace,
    output_dir: Path,
    device: torch.device,
) -> SFTTrainer:
    """TRL's SFTTrainer with the PERFT adapter; completion-only loss, progress bar, no checkpoints."""
    config = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        max_length=args.max_length,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        disable_tqdm=False,
        dataloader_num_workers=0,
        # Recomputing activations saves memory a large model needs on a GPU and only costs time on a tiny one.
        **{CHECKPOINTING_FIELD: device.type == "cuda"},
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=train.select_columns(["prompt", "completion"]),
        processing_class=tokenizer,
        peft_config=perft_config_from_args(args),
    )


@torch.no_grad()
def check_reload(
    trained: torch.nn.Module,
    model_name_or_path: str,
    adapter_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    test: Dataset,
    device: torch.device,
    quantize: str | None = None,
    num_examples: int = 16,
) -> dict[str, Any]:
    """Load a fresh base, put the saved adapter on it with PeftModel.from_pretrained, compare the logits.

    On a CPU the comparison is exact (the same float32 operations in the same order); on a GPU, kernels may
    reorder sums, so a difference within bfloat16 rounding of the logit scale is accepted.
    """
    base = load_base_model(model_name_or_path, device, quantize)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    texts = [row["prompt"] + row["completion"] for row in test.select(range(min(num_examples, len(test))))]
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
    expected = trained(**batch).logits.float()
    actual = reloaded(**batch).logits.float()
    max_abs_diff = (expected - actual).abs().max().item()
    tolerance = 0.0 if device.type == "cpu" else 1e-2 * expected.abs().max().item()
    return {"passed": max_abs_diff <= tolerance, "max_abs_diff": max_abs_diff, "tolerance": tolerance}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the run: GPU memory allocated by torch on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of the demo."""
    before, after = report["accuracy_before"], report["accuracy_after"]
    config = report["perft_config"]
    routing = f"top-{config['top_k']} routed" if config["top_k"] else "always on"
    lines = [
        "",
        "PERFT demo report",
        f"  model:       {report['model']}",
        f"  task:        {report['task']} ({report['train_examples']} train / {report['test_examples']} held out)",
        f"  adapter:     PERFT-{config['variant']}, r={config['r']}, {config['num_experts']} experts ({routing}) "
        f"in {config['adapted_blocks']} MoE blocks; {report['steps']} steps of batch {report['batch_size']}",
        "  accuracy on held-out examples (exact match of greedy generation unless --eval-task):",
    ]
    for name in after:
        lines.append(f"    {name:<8} {before.get(name, 0.0):7.1%} -> {after[name]:7.1%}")
    reload = report["reload_check"]
    lines += [
        f"  trainable:   {report['trainable_parameters']:,} of {report['total_parameters']:,} parameters "
        f"({report['trainable_share']:.2%})",
        f"  time:        {report['wall_seconds']:.0f} s in all, {report['train_seconds']:.0f} s training",
        f"  peak memory: {report['peak_memory_mb']:.0f} MiB ({report['device']})",
        f"  reload:      {'logits match' if reload['passed'] else 'LOGITS DIFFER'} "
        f"(max |diff| {reload['max_abs_diff']:.3g})",
        f"  adapter:     {report['adapter_dir']}",
    ]
    lines += [f"  heatmap:     {path}" for path in report["heatmaps"]]
    lines.append(f"  report:      {report['report_path']}")
    return "\n".join(lines)
