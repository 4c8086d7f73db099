"""`peft-perft eval`: evaluate a base model or a base model plus adapter with the PERFT paper's protocol."""

from __future__ import annotations

import argparse

import torch

from peft_perft.cli.inputs import InputError, require_adapter, require_dataset, require_model, require_tokenizer
from peft_perft.evaluation.answers import TASK_GROUPS, TASKS
from peft_perft.evaluation.data import resolve_tasks
from peft_perft.evaluation.runner import DTYPES, GenerationSettings, evaluate, load_model


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `peft-perft eval`."""
    parser.add_argument("--model", required=True, help="base model: local folder or Hugging Face Hub id")
    parser.add_argument(
        "--adapter",
        help="PERFT or other PEFT adapter to load on top: local folder or Hub id (default: none, the base model alone)",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder or Hub id, for a --model folder saved without one (default: the one in --model)",
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        help="a test file, one task's folder holding test.json, a folder laid out as <root>/<task>/test.json "
        "(LLM-Adapters), or a Hub dataset id with that layout",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help=f"tasks or groups ({', '.join(TASK_GROUPS)}); tasks: {', '.join(TASKS)} (default: every task the data "
        "holds)",
    )
    parser.add_argument(
        "--max-samples", type=_positive_int, help="evaluate only the first N records of each task (default: all)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--num-beams", type=_positive_int, default=1, help="beams per prompt: 1 is greedy, 4 reproduces the paper"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="tokens to generate (default: 32 for commonsense tasks, 256 for arithmetic ones)",
    )
    parser.add_argument(
        "--output-dir",
        default="eval-results",
        help="where results.json, results.md and predictions.jsonl go",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: GPU when available)")


def validate_eval_args(args: argparse.Namespace) -> None:
    """Model, adapter, data and tasks exist and fit together, checked before the model is loaded."""
    require_model(args.model)
    if args.tokenizer is None:
        require_tokenizer(args.model, flag="--model")
    else:
        require_tokenizer(args.tokenizer, flag="--tokenizer")
    if args.adapter is not None:
        require_adapter(args.adapter)
    require_dataset(args.data_dir, flag="--data-dir")
    try:
        resolve_tasks(args.tasks, args.data_dir)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(f"--data-dir / --tasks: {error}") from None
    if args.device != "auto":
        try:
            torch.device(args.device)
        except RuntimeError:
            raise InputError(f"--device {args.device} is not a device: use auto, cpu, cuda or cuda:N.") from None


def run_cli(args: argparse.Namespace) -> int:
    """Check the inputs, load, evaluate, write the reports and print the Markdown table."""
    validate_eval_args(args)
    model, tokenizer = load_model(
        args.model, args.adapter, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer
    )
    settings = GenerationSettings(args.batch_size, args.num_beams, args.max_new_tokens)
    report = evaluate(model, tokenizer, args.data_dir, args.tasks, settings, args.max_samples)
    report.metadata.update(model=args.model, adapter=args.adapter, tokenizer=args.tokenizer, dtype=args.dtype)
    paths = report.write(args.output_dir)
    print(report.to_markdown())
    print(f"Wrote {', '.join(str(path) for path in paths.values())}")
    return 0
