"""Training-step time, peak memory and decode latency of PERFT variants and LoRA baselines on an OLMoE-shaped model.

One run builds every variant on the same randomly initialised model (no download), then times training steps
(forward + backward + optimizer step) with the variants interleaved in every repetition, so that a shared or
throttling machine slows them alike. The reference is the frozen model with gradients flowing to its input
embeddings (``inputs_embeds.requires_grad_()``): the least any method that backpropagates through the network
pays. It prints ratios to that reference and writes JSON and Markdown under ``benchmarks/results/``.

    python benchmarks/olmoe_step.py                       # CPU shape, fp32 (what BENCHMARKS.md records)
    python benchmarks/olmoe_step.py --shape olmoe --device cuda --dtype bfloat16   # full OLMoE layer shape

Peak memory: on CUDA ``max_memory_allocated`` per variant; on CPU, where torch keeps no allocator statistics,
each variant runs alone in a child process that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
after building the model and reports the peak resident set size (``VmHWM``) over two training steps, next to
its resident size before them.

Ratios are given two ways: of the medians, and of the minima (the least-disturbed runs; on a shared machine
the minimum is the better estimate of the uncontended time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import OlmoeConfig, OlmoeForCausalLM

import peft_perft

SHAPES = {
    # OLMoE-1B-7B scaled down 4x in width (hidden 2048 -> 512, expert width 1024 -> 256, 16 -> 8 heads of 64),
    # with a vocabulary scaled so that the LM head keeps its ~10% share of the forward FLOPs.
    "cpu": {"hidden_size": 512, "intermediate_size": 256, "num_attention_heads": 8, "vocab_size": 4096},
    "olmoe": {"hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16, "vocab_size": 50304},
}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TARGETS = {"perft-r": 1.05, "perft-e": 1.15}  # step time over the frozen model's
DECODE_TARGET = 1.10
LORA_EXPERTS_SPEEDUP_TARGET = 1.8


@dataclass
class Variant:
    """A named way of training the model: a peft config (None: frozen) and a dispatch backend for PERFT."""

    name: str
    config: PeftConfig | None


def model_config(shape: str, layers: int) -> OlmoeConfig:
    return OlmoeConfig(
        **SHAPES[shape],
        num_key_value_heads=SHAPES[shape]["num_attention_heads"],
        num_hidden_layers=layers,
        num_experts=64,
        num_experts_per_tok=8,
        output_router_logits=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def perft_config(variant: str, backend: str) -> peft_perft.PerftConfig:
    routed = {"num_experts": 16, "top_k": 4} if variant == "R" else {}
    return peft_perft.PerftConfig(variant=variant, r=16, lora_alpha=32, dispatch_backend=backend, **routed)


def lora_experts_rank(config: OlmoeConfig, perft_e_parameters: int) -> int:
    """LoRA rank on the fused expert weights whose trainable-parameter count is closest to PERFT-E's.

    peft's LoRA on a 3-D (experts, d1, d2) parameter trains experts * r * (d1 + d2) values."""
    experts, hidden, width = config.num_experts, config.hidden_size, config.intermediate_size
    per_rank = config.num_hidden_layers * experts * ((2 * width + hidden) + (hidden + width))
    return max(1, round(perft_e_parameters / per_rank))


def variants(config: OlmoeConfig, names: list[str]) -> list[Variant]:
    """Variant specs; ``perft-r@dense`` style names force a dispatch backend."""
    perft_e_parameters = config.num_hidden_layers * config.num_experts * 2 * 16 * config.hidden_size
    built = []
    for name in names:
        base, _, backend = name.partition("@")
        if base == "frozen":
            built.append(Variant(name, None))
        elif base.startswith("perft-"):
            built.append(Variant(name, perft_config(base[-1].upper(), backend or "auto")))
        elif base == "lora-attn":
            built.append(Variant(name, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])))
        elif base == "lora-experts":
            rank = lora_experts_rank(config, perft_e_parameters)
            built.append(
                Variant(
                    name,
                    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=EXPERT_PARAMETERS),
                )
            )
        else:
            raise ValueError(f"Unknown variant {name!r}: use frozen, perft-r|e|d|s[@backend], lora-attn, lora-experts.")
    return built


class Trainer:
    """One variant's model, optimizer and fixed batch; ``step`` is one full training step."""

    def __init__(self, variant: Variant, config: OlmoeConfig, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        with torch.device(args.device):  # initialise on the target device: the full OLMoE shape is slow on a CPU
            model = OlmoeForCausalLM(config).to(dtype=getattr(torch, args.dtype))
        model.requires_grad_(False)
        self.model = model if variant.config is None else get_peft_model(model, variant.config)
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(
            3, config.vocab_size, (args.batch, args.tokens // args.batch), generator=generator
        ).to(args.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_parameters = sum(p.numel() for p in trainable)
        self.inputs_embeds = None
        if variant.config is None:
            embeddings = self.model.get_input_embeddings()(self.input_ids).detach()
            self.inputs_embeds = embeddings.requires_grad_()
            trainable = [self.inputs_embeds]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        self.device = args.device

    def step(self) -> float:
        """Forward, backward and optimizer step; seconds."""
        _synchronize(self.device)
        start = time.perf_counter()
        if self.inputs_embeds is not None:
            loss = self.model(inputs_embeds=self.inputs_embeds, labels=self.input_ids).loss
        else:
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode_seconds_per_token(self, prompt_tokens: int, new_tokens: int) -> float:
        """Greedy generation with the KV cache: time of ``new_tokens`` steps minus the prefill and first token."""
        self.model.eval()
        prompt = self.input_ids[:1, :prompt_tokens]

        def generate(count: int) -> float:
            _synchronize(self.device)
            start = time.perf_counter()
            self.model.generate(
                input_ids=prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False, use_cache=True
            )
            _synchronize(self.device)
            return time.perf_counter() - start

        seconds = (generate(new_tokens + 1) - generate(1)) / new_tokens
        self.model.train()
        return seconds


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(trainers: dict[str, Trainer], repetitions: int, measure) -> dict[str, list[float]]:
    """Run ``measure(trainer)`` for every variant in every repetition, rotating the order each time."""
    names = list(trainers)
    results: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(measure(trainers[name]))
    return results


def peak_memory_mb(variant_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of training steps for one variant (see the module docstring for how)."""
    if args.device.startswith("cuda"):
        config = model_config(args.shape, args.layers)
        trainer = Trainer(variants(config, [variant_name])[0], config, args)
        trainer.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del trainer
        torch.cuda.empty_cache()
        return {"resident_mb": before, "peak_mb": peak}
    command = [sys.executable, __file__, "--memory-child", variant_name, *_shape_arguments(args)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _shape_arguments(args: argparse.Namespace) -> list[str]:
    return [
        f"--shape={args.shape}",
        f"--layers={args.layers}",
        f"--tokens={args.tokens}",
        f"--batch={args.batch}",
        f"--dtype={args.dtype}",
        f"--device={args.device}",
        f"--threads={args.threads}",
    ]


def memory_child(variant_name: str, args: argparse.Namespace) -> None:
    """Child process: build one variant, note its resident size, run two steps, print the peak as JSON."""
    config = model_config(args.shape, args.layers)
    trainer = Trainer(variants(config, [variant_name])[0], config, args)
    resident = _proc_status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    trainer.step()
    trainer.step()
    print(json.dumps({"resident_mb": resident, "peak_mb": _proc_status_mb("VmHWM")}))


def _proc_status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def summarize(trainers, step_times, decode_times, memory, args) -> dict:
    frozen_step = statistics.median(step_times["frozen"])
    frozen_step_min = min(step_times["frozen"])
    frozen_decode = statistics.median(decode_times["frozen"]) if decode_times["frozen"] else None
    lora_experts_step = statistics.median(step_times["lora-experts"]) if "lora-experts" in step_times else None
    rows = []
    for name, trainer in trainers.items():
        step = statistics.median(step_times[name])
        decode = statistics.median(decode_times[name]) if frozen_decode else None
        rows.append(
            {
                "variant": name,
                "trainable_parameters": trainer.trainable_parameters if name != "frozen" else 0,
                "step_ms_median": step * 1e3,
                "step_ms_min": min(step_times[name]) * 1e3,
                "step_vs_frozen": step / frozen_step,
                "step_vs_frozen_of_minima": min(step_times[name]) / frozen_step_min,
                "lora_experts_over_this": lora_experts_step / step if lora_experts_step else None,
                "decode_ms_per_token": decode * 1e3 if decode else None,
                "decode_vs_frozen": decode / frozen_decode if decode else None,
                "decode_vs_frozen_of_minima": min(decode_times[name]) / min(decode_times["frozen"]) if decode else None,
                **memory[name],
            }
        )
    return {
        "machine": _machine(args),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "memory_child"},
        "rows": rows,
        "raw_step_seconds": step_times,
        "raw_decode_seconds_per_token": decode_times,
    }


def _machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown(summary: dict) -> str:
    lines = [
        f"Machine: {summary['machine']}  ",
        f"Command: `{summary['command']}`",
        "",
        "| variant | trainable params | step ms (median / min) | step / frozen (medians / minima) | LoRA-experts step "
        "/ this | peak MB (resident before) | decode ms/token (median) | decode / frozen (medians / minima) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        speedup = f"{row['lora_experts_over_this']:.2f}x" if row["lora_experts_over_this"] else "-"
        memory = f"{row['peak_mb']:.0f} ({row['resident_mb']:.0f})" if "peak_mb" in row else "-"
        decode = "- | -"
        if row["decode_vs_frozen"]:
            decode = (
                f"{row['decode_ms_per_token']:.2f} | {row['decode_vs_frozen']:.3f} / "
                f"{row['decode_vs_frozen_of_minima']:.3f}"
            )
        lines.append(
            f"| {row['variant']} | {row['trainable_parameters']:,} | {row['step_ms_median']:.0f} / "
            f"{row['step_ms_min']:.0f} | {row['step_vs_frozen']:.3f} / {row['step_vs_frozen_of_minima']:.3f} | "
            f"{speedup} | {memory} | {decode} |"
        )
    return "\n".join(lines) + "\n"


def target_report(summary: dict) -> list[str]:
    """One line per target of the issue: measured figure and whether it is met."""
    rows = {row["variant"]: row for row in summary["rows"]}
    lines = []
    for name, limit in TARGETS.items():
        if name in rows:
            ratio = rows[name]["step_vs_frozen"]
            lines.append(
                f"{name} step {ratio:.3f}x frozen (target <= {limit}): {'met' if ratio <= limit else 'MISSED'}"
            )
    for name, row in rows.items():
        if row["lora_experts_over_this"] and name not in ("frozen", "lora-experts"):
            speedup = row["lora_experts_over_this"]
            verdict = "met" if speedup >= LORA_EXPERTS_SPEEDUP_TARGET else "MISSED"
            lines.append(f"{name} {speedup:.2f}x faster than lora-experts (target >= 1.8): {verdict}")
        if name.startswith("perft-") and row["decode_vs_frozen"]:
            ratio, of_minima = row["decode_vs_frozen"], row["decode_vs_frozen_of_minima"]
            verdict = "met" if ratio <= DECODE_TARGET else "MISSED"
            lines.append(
                f"{name} decode {ratio:.3f}x frozen, {of_minima:.3f}x of minima (target <= {DECODE_TARGET}): {verdict}"
            )
    return lines


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (tokens are split among them)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["frozen", "perft-r", "perft-e", "perft-d", "perft-s", "lora-attn", "lora-experts"],
    )
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--decode-repetitions", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory runs (faster, for exploring)")
    parser.add_argument("--skip-decode", action="store_true", help="no decode-latency runs (faster, for exploring)")
    parser.add_argument("--output", type=Path, default=None, help="path stem; default benchmarks/results/<shape>_...")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    if "frozen" not in args.variants:
        args.variants.insert(0, "frozen")
    config = model_config(args.shape, args.layers)
    trainers = {variant.name: Trainer(variant, config, args) for variant in variants(config, args.variants)}
    for trainer in trainers.values():  # warm-up: allocator, optimizer state, lazy imports
        trainer.step()
    step_times = interleaved(trainers, args.repetitions, Trainer.step)
    decode_repetitions = 0 if args.skip_decode else args.decode_repetitions
    decode_times = interleaved(
        trainers, decode_repetitions, lambda t: t.decode_seconds_per_token(args.prompt_tokens, args.new_tokens)
    )
    memory = {name: {} if args.skip_memory else peak_memory_mb(name, args) for name in trainers}
    summary = summarize(trainers, step_times, decode_times, memory, args)
    stem = args.output or Path("benchmarks/results") / f"olmoe_{args.shape}_{args.device.split(':')[0]}_{args.dtype}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    stem.with_suffix(".md").write_text(table + "\n" + "\n".join(f"- {line}" for line in target_report(summary)) + "\n")
    print(table)
    print("\n".join(target_report(summary)))


if __name__ == "__main__":
    main()
