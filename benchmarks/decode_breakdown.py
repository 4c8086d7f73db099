"""Where PERFT-R's and PERFT-E's decode overhead goes: the routed dispatch against everything else.

Builds the OLMoE-shaped CPU model of ``olmoe_step.py`` as frozen, PERFT-R and PERFT-E, and times greedy decoding
with the KV cache per token, interleaved, in two modes: as shipped, and with the routed dispatch replaced by a
zero tensor of the right shape (a probe that leaves the wrapper, the hook, PERFT-R's router and the output
additions in place). During the runs it also times every MoE block's forward (the frozen block, or PERFT's
wrapper around it) per decode step; those timing hooks slow every variant alike by a few microseconds per block,
so the ratios here read slightly lower than ``olmoe_step.py``'s. Prints a Markdown table and writes JSON and
Markdown under ``benchmarks/results/``.

    python benchmarks/decode_breakdown.py --repetitions 9
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from olmoe_step import Trainer, model_config, variants  # noqa: E402

from peft_perft import terms  # noqa: E402
from peft_perft.layer import PerftMoeBlock  # noqa: E402

NAMES = ["frozen", "perft-r", "perft-e"]
PROMPT_TOKENS, NEW_TOKENS = 32, 32


@contextlib.contextmanager
def zero_dispatch() -> Iterator[None]:
    """Replace the routed dispatch by zeros for the duration (a probe, not a mode of the package)."""
    shipped = terms.routed_experts
    terms.routed_experts = lambda adapter_input, *rest: torch.zeros_like(adapter_input)
    try:
        yield
    finally:
        terms.routed_experts = shipped


def time_block_forwards(model: torch.nn.Module, sinks: dict[str, list[float]]) -> None:
    """Record the wall time of every MoE block forward (the outermost block) into ``sinks["current"]``."""
    blocks = [m for m in model.modules() if isinstance(m, PerftMoeBlock)]
    if not blocks:
        blocks = [m for m in model.modules() if type(m).__name__ == "OlmoeSparseMoeBlock"]
    started: list[float] = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *args: started.append(time.perf_counter()))
        block.register_forward_hook(lambda *args: sinks["current"].append(time.perf_counter() - started.pop()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/decode_breakdown_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = argparse.Namespace(device="cpu", dtype="float32", batch=4, tokens=1024)
    config = model_config("cpu", 4)
    trainers = {variant.name: Trainer(variant, config, shape) for variant in variants(config, NAMES)}
    sinks: dict[str, list[float]] = {"current": []}
    for trainer in trainers.values():
        trainer.decode_seconds_per_token(PROMPT_TOKENS, 4)  # warm-up
        time_block_forwards(trainer.model, sinks)
    runs = [(name, mode) for name in NAMES for mode in (("shipped", "zero dispatch") if name != "frozen" else ("-",))]
    per_token: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    block_times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for repetition in range(args.repetitions):
        shift = repetition % len(runs)
        for name, mode in runs[shift:] + runs[:shift]:
            sinks["current"] = block_times[(name, mode)]
            with zero_dispatch() if mode == "zero dispatch" else contextlib.nullcontext():
                per_token[(name, mode)].append(trainers[name].decode_seconds_per_token(PROMPT_TOKENS, NEW_TOKENS))
    frozen = statistics.median(per_token[("frozen", "-")])
    rows = [
        {
            "variant": name,
            "dispatch": mode,
            "decode_ms_per_token": statistics.median(times) * 1e3,
            "vs_frozen": statistics.median(times) / frozen,
            "block_us_per_step": statistics.median(block_times[(name, mode)]) * 1e6,
        }
        for (name, mode), times in per_token.items()
    ]
    table = [
        f"Command: `python benchmarks/decode_breakdown.py --repetitions {args.repetitions}` "
        f"({args.threads} threads, torch {torch.__version__})",
        "",
        "| variant | dispatch | decode ms/token (median) | decode / frozen | one MoE block per step, median µs |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['variant']} | {r['dispatch']} | {r['decode_ms_per_token']:.2f} | {r['vs_frozen']:.3f} "
            f"| {r['block_us_per_step']:.0f} |"
            for r in rows
        ),
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    args.output.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
