"""What each variant adds to a training step and to a decode step, op by op, counted with ``torch.profiler``.

Builds the models of ``olmoe_step.py`` (same shape, same protocol: the frozen reference's zero bias, both
backward depths; learning rate 0, see ``profile_variant``), runs one warm-up and then ``--repeats`` profiled
training steps per protocol and profiled decode steps (a single token through the model with a KV cache
filled by a 32-token prompt). Every op call is keyed by its name and input shapes, and the variant's calls are
matched against the frozen reference's:

- **extra calls** per op: the variant's count minus frozen's, per (name, shapes). These counts do not depend
  on the machine's load: they are exactly the work a variant adds beyond, or besides, its FLOPs.
- **extra self CPU time**: for every (name, shapes) the variant calls more often, the extra calls times the
  variant's median self CPU time per call (fewer calls count negative, at frozen's time per call). Ops called
  equally often are the same work in both and contribute nothing, so this estimate does not suffer from the
  noise of two large totals subtracted; it is still a timing (under the profiler's overhead, on a shared machine).

Prints Markdown and writes JSON and Markdown under ``benchmarks/results/``.

    python benchmarks/profile_step.py --threads 1       # frozen, perft-r, perft-e, perft-d, perft-s
    python benchmarks/profile_step.py --threads 1 --variants frozen perft-e --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from olmoe_step import PROTOCOLS, Trainer, model_config, variants  # noqa: E402

PROMPT_TOKENS = 32
PHASES = [f"step [{protocol}]" for protocol in PROTOCOLS] + ["decode"]
OpCalls = dict[str, dict[str, float]]
"""Per ``name shapes`` key: ``count`` (calls in one run) and ``self_us`` (median self CPU time per call)."""


def profiled_calls(run: Callable[[], object], repeats: int) -> OpCalls:
    """Run ``repeats`` times under the profiler; per (op name, input shapes): calls per run, median self time."""
    counts: list[dict[str, int]] = []
    per_call: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            run()
        count: dict[str, int] = defaultdict(int)
        total: dict[str, float] = defaultdict(float)
        for event in profiler.events():
            key = f"{event.name} {event.input_shapes}"
            count[key] += 1
            total[key] += event.self_cpu_time_total
        for key in count:
            per_call[key].append(total[key] / count[key])
        counts.append(dict(count))
    if any(count != counts[0] for count in counts):
        raise RuntimeError("The op calls differ between two runs of the same step: the counts would not be exact.")
    return {key: {"count": n, "self_us": statistics.median(per_call[key])} for key, n in counts[0].items()}


def decode_step(trainer: Trainer) -> Callable[[], object]:
    """One greedy decode step (forward of one token with the KV cache of a prompt), ready to be called; the
    cache drops the new token after each call, so every call does the same work."""
    model = trainer.model
    model.eval()
    prompt = trainer.input_ids[:1, :PROMPT_TOKENS]
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    token = prompt[:, -1:]

    @torch.no_grad()
    def step() -> object:
        output = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)
        return output

    return step


def profile_variant(trainer: Trainer, repeats: int) -> dict[str, OpCalls]:
    """Op calls of a training step under each protocol and of a decode step (each after a warm-up).

    The learning rate is 0: the optimizer runs all its ops but changes no weight, so the routing, and with it the
    shapes of the per-expert GEMMs that torch's CPU grouped_mm runs, is the same in every run, and the same as
    the frozen reference's (the adapters start with B = 0, the reference's bias at 0)."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    result = {}
    for protocol, embedding_grads in PROTOCOLS.items():
        trainer.step(embedding_grads)
        result[f"step [{protocol}]"] = profiled_calls(lambda grads=embedding_grads: trainer.step(grads), repeats)
    step = decode_step(trainer)
    step()
    result["decode"] = profiled_calls(step, repeats)
    trainer.model.train()
    return result


def extra_calls(calls: OpCalls, reference: OpCalls) -> dict[str, dict[str, float]]:
    """Per op name: calls beyond the reference's (over all shapes) and their estimated self CPU time (µs)."""
    by_name: dict[str, dict[str, float]] = defaultdict(lambda: {"extra_count": 0, "extra_self_us": 0.0})
    for key in set(calls) | set(reference):
        mine, theirs = calls.get(key, {"count": 0}), reference.get(key, {"count": 0})
        extra = mine["count"] - theirs["count"]
        if extra:
            per_call = mine["self_us"] if extra > 0 else theirs["self_us"]
            row = by_name[key.split(" ", 1)[0]]
            row["extra_count"] += extra
            row["extra_self_us"] += extra * per_call
    return dict(by_name)


def by_name(profiles: dict[str, dict[str, OpCalls]]) -> dict:
    """Per variant and phase, per op name: calls and self CPU µs summed over shapes, and the extra calls over
    frozen (the JSON the script writes; per-shape keys would make it megabytes)."""
    result = {}
    for name, phases in profiles.items():
        result[name] = {}
        for phase, calls in phases.items():
            ops: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "self_us": 0.0})
            for key, op in calls.items():
                ops[key.split(" ", 1)[0]]["count"] += op["count"]
                ops[key.split(" ", 1)[0]]["self_us"] += op["count"] * op["self_us"]
            extra = extra_calls(calls, profiles["frozen"][phase]) if name != "frozen" else {}
            result[name][phase] = {"ops": dict(ops), "extra_over_frozen": extra}
    return result


def total_self_us(calls: OpCalls) -> float:
    return sum(op["count"] * op["self_us"] for op in calls.values())


def markdown(profiles: dict[str, dict[str, OpCalls]], args: argparse.Namespace) -> str:
    reference = profiles["frozen"]
    lines = [
        f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}` ({args.threads} threads, "
        f"torch {torch.__version__})",
        "",
        "Op calls per training step and per decode step, against the frozen reference's (matched by op name and "
        "input shapes); extra self CPU time = extra calls x the variant's median self time per call.",
        "",
        "| variant | phase | op calls | extra calls | frozen self CPU ms | extra self CPU ms (share of frozen) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, phases in profiles.items():
        if name == "frozen":
            continue
        for phase in PHASES:
            extras = extra_calls(phases[phase], reference[phase]).values()
            count = sum(op["count"] for op in phases[phase].values())
            extra_us = sum(row["extra_self_us"] for row in extras)
            frozen_us = total_self_us(reference[phase])
            lines.append(
                f"| {name} | {phase} | {count} | {sum(row['extra_count'] for row in extras):+d} | "
                f"{frozen_us / 1e3:.1f} | {extra_us / 1e3:+.2f} ({extra_us / frozen_us:+.1%}) |"
            )
    for name, phases in profiles.items():
        if name == "frozen":
            continue
        for phase in PHASES:
            rows = sorted(extra_calls(phases[phase], reference[phase]).items(), key=lambda kv: -kv[1]["extra_self_us"])
            lines += [
                "",
                f"**{name}, {phase}**: extra calls by op, largest extra self time first",
                "",
                "| op | extra calls | extra self CPU µs |",
                "|---|---:|---:|",
                *(
                    f"| `{op}` | {row['extra_count']:+d} | {row['extra_self_us']:+.0f} |"
                    for op, row in rows[: args.rows]
                    if row["extra_count"]
                ),
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["frozen", "perft-r", "perft-e", "perft-d", "perft-s"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="profiled runs per phase (median time per call)")
    parser.add_argument("--rows", type=int, default=15, help="ops listed per variant and phase")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/profile_step_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "frozen" not in args.variants:
        args.variants.insert(0, "frozen")
    shape = argparse.Namespace(
        device="cpu", dtype="float32", batch=args.batch, tokens=args.tokens, compile=False, clock="wall"
    )
    config = model_config("cpu", args.layers)
    profiles = {}
    for variant in variants(config, args.variants):  # one model at a time: the profiles are not timings
        profiles[variant.name] = profile_variant(Trainer(variant, config, shape), args.repeats)
    table = markdown(profiles, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(by_name(profiles), indent=1))
    args.output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
