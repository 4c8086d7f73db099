"""Kernel-level sweep of the routed dispatch backends: the measurements behind ``auto``'s thresholds.

For each shape (tokens T, hidden D, experts N, top-k K, rank r) it times every backend that supports the
inputs, interleaving the backends within each repetition so that a noisy (shared) machine slows them alike,
in two modes: ``train`` (forward + backward to inputs, A, B and routing weights) and ``infer`` (forward under
``no_grad``). It prints the fastest backend per shape next to what ``auto`` chose and writes JSON + Markdown.
``gather`` is skipped above 256 (token, expert) pairs, where it is far behind (it copies T*K weight slices).

    python benchmarks/dispatch_sweep.py --output benchmarks/results/dispatch_sweep_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_perft.dispatch import available_backends, routed_experts, select_backend

MAX_GATHER_PAIRS = 256
EXPERT_SHAPES = {  # (N, K, r)
    "PERFT-R N16 K4 r16": (16, 4, 16),
    "PERFT-E N64 K8 r16": (64, 8, 16),
    "small N8 K2 r8": (8, 2, 8),
    "wide N32 K2 r32": (32, 2, 32),
}


def _inputs(tokens: int, hidden: int, experts: int, top_k: int, rank: int, grad: bool, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=generator, dtype=dtype)
    lora_A = torch.randn(experts, rank, hidden, generator=generator, dtype=dtype) / hidden**0.5
    lora_B = torch.randn(experts, hidden, rank, generator=generator, dtype=dtype) / rank**0.5
    scores = torch.randn(tokens, experts, generator=generator).softmax(-1)
    weight, index = scores.topk(top_k, dim=-1)
    leaves = [hidden_states, lora_A, lora_B, weight.to(dtype)]
    for leaf in leaves:
        leaf.requires_grad_(grad)
    return (*leaves[:3], index, leaves[3])


def _time_once(backend: str, inputs: tuple, train: bool) -> float:
    hidden_states, lora_A, lora_B, index, weight = inputs
    start = time.perf_counter()
    if train:
        out = routed_experts(hidden_states, lora_A, lora_B, index, weight, F.silu, backend=backend)
        torch.autograd.grad(out, (hidden_states, lora_A, lora_B, weight), torch.ones_like(out))
    else:
        with torch.no_grad():
            routed_experts(hidden_states, lora_A, lora_B, index, weight, F.silu, backend=backend)
    return time.perf_counter() - start


def sweep(token_counts: list[int], hidden: int, repetitions: int, dtype: torch.dtype) -> list[dict]:
    """Time every supporting backend on every shape; interleaved repetitions, median and min in milliseconds."""
    rows = []
    for shape_name, (experts, top_k, rank) in EXPERT_SHAPES.items():
        for tokens in token_counts:
            for mode in ("train", "infer"):
                inputs = _inputs(tokens, hidden, experts, top_k, rank, mode == "train", dtype)
                backends = [name for name in available_backends() if _supported(name, inputs[0], inputs[1], inputs[3])]
                timings: dict[str, list[float]] = {name: [] for name in backends}
                for name in backends:  # warm-up
                    _time_once(name, inputs, mode == "train")
                for _ in range(repetitions):
                    for name in backends:
                        timings[name].append(_time_once(name, inputs, mode == "train"))
                median = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
                rows.append(
                    {
                        "shape": shape_name,
                        "tokens": tokens,
                        "hidden": hidden,
                        "mode": mode,
                        "median_ms": median,
                        "min_ms": {name: min(values) * 1e3 for name, values in timings.items()},
                        "fastest": min(median, key=median.get),
                        "auto": select_backend("auto", inputs[0], inputs[1], inputs[3]).name,
                    }
                )
                print(_format_row(rows[-1]), flush=True)
    return rows


def _supported(name: str, hidden_states: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor) -> bool:
    try:
        select_backend(name, hidden_states, lora_A, index)
    except RuntimeError:
        return False
    return True


def _format_row(row: dict) -> str:
    times = ", ".join(f"{name} {value:.3f}" for name, value in sorted(row["median_ms"].items()))
    auto_ms, best_ms = row["median_ms"][row["auto"]], row["median_ms"][row["fastest"]]
    return (
        f"{row['shape']:<20} T={row['tokens']:<5} {row['mode']:<5} | {times} | fastest {row['fastest']}, "
        f"auto {row['auto']} ({auto_ms / best_ms:.2f}x best)"
    )


def _markdown(rows: list[dict], header: str) -> str:
    names = sorted({name for row in rows for name in row["median_ms"]})
    lines = [header, "", "| shape | T | mode | " + " | ".join(f"{n} (ms)" for n in names) + " | fastest | auto |"]
    lines.append("|" + "---|" * (len(names) + 5))
    for row in rows:
        cells = [f"{row['median_ms'][n]:.3f}" if n in row["median_ms"] else "-" for n in names]
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['mode']} | " + " | ".join(cells) + f" | {row['fastest']} | "
            f"{row['auto']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/dispatch_sweep_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = sweep(args.tokens, args.hidden, args.repetitions, getattr(torch, args.dtype))
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    header = f"Dispatch sweep, D={args.hidden}, {args.dtype}, median of {args.repetitions} interleaved runs ({machine})"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    args.output.with_suffix(".md").write_text(_markdown(rows, header))


if __name__ == "__main__":
    main()
