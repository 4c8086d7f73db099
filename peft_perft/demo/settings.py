"""The demo's settings: one typed record built once from the command line, read by every step of the run.

The flags of ``peft-perft demo`` take their defaults from `DemoSettings`, so the two cannot drift apart; the
report records the command line that repeats a run (`DemoSettings.command_line`).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from peft_perft.config import VARIANTS
from peft_perft.quantization import add_quantize_argument
from peft_perft.workflow import BUNDLED_DATASET, BUNDLED_MODEL_DIR


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run does; the defaults reproduce the bundled demo on a CPU in under three minutes."""

    variant: str = "R"
    r: int = 8
    lora_alpha: float = 16.0
    num_experts: int | None = None
    top_k: int | None = None
    steps: int = 800
    learning_rate: float = 5e-3
    batch_size: int = 32
    output_dir: Path = Path("perft-demo-output")
    overwrite: bool = False
    model: str = BUNDLED_MODEL_DIR
    dataset: str = BUNDLED_DATASET
    eval_task: str | None = None
    max_eval_samples: int = 200
    max_new_tokens: int | None = None
    max_length: int = 512
    seed: int = 0
    threads: int | None = None
    report_to: str = "none"
    quantize: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoSettings:
        """The settings the parsed flags of ``peft-perft demo`` describe (other attributes are ignored)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def command_line(self) -> str:
        """The ``peft-perft demo`` command line that repeats this run: every flag with its value (defaults too)."""
        words = ["peft-perft", "demo"]
        for name, value in asdict(self).items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            words += [flag] if value is True else [flag, str(value)]
        return shlex.join(words)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``peft-perft demo``, with `DemoSettings`' defaults."""
    defaults = DemoSettings()
    parser.add_argument("--variant", choices=VARIANTS, default=defaults.variant, help="PERFT variant")
    parser.add_argument("--r", type=int, default=defaults.r, help="bottleneck rank of each adapter expert")
    parser.add_argument(
        "--lora-alpha", type=float, default=defaults.lora_alpha, help="adapter scaling numerator; the scale is alpha/r"
    )
    parser.add_argument(
        "--num-experts",
        type=int,
        default=defaults.num_experts,
        help="adapter experts per block, R, D and S only (default: R 8, D 2, S 1)",
    )
    parser.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="PERFT-R adapter experts per token (default: 2)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate of the cosine schedule"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="training examples per optimizer step"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=defaults.output_dir, help="where the adapter, heatmaps and report go"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output-dir that already holds files, once this run has finished (default: refuse it)",
    )
    parser.add_argument(
        "--model", default=defaults.model, help="Hub model id or local path (default: the bundled OLMoE)"
    )
    parser.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="'bundled', a datasets name, or a local JSON/JSONL file with prompt/completion or LLM-Adapters "
        "instruction/input/output(/answer) records",
    )
    parser.add_argument(
        "--eval-task",
        default=defaults.eval_task,
        help="score with this LLM-Adapters task's answer rule, e.g. gsm8k (default: exact match of the completion)",
    )
    parser.add_argument(
        "--max-eval-samples", type=int, default=defaults.max_eval_samples, help="held-out examples to score"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="generation length when scoring (default: bundled task 10, --eval-task 256, other data 64)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="truncate training sequences to this many tokens, capped at the model's context, 64 tokens for the "
        "bundled model",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the data, the adapter's init and training"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="CPU threads for torch (default: 1 for the bundled model, whose tiny matrices gain nothing from more; "
        "torch's choice otherwise)",
    )
    parser.add_argument(
        "--report-to", default=defaults.report_to, help="Trainer logging backends, e.g. tensorboard or wandb"
    )
    add_quantize_argument(parser)
