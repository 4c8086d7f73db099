"""Training-step time, peak memory and decode latency of PERFT variants and LoRA baselines on an OLMoE-shaped model.

One run builds every variant on the same randomly initialised model (no download), then times training steps
(forward + backward + optimizer step). The protocol:

- **Same backward depth for every setup.** The frozen reference carries one trainable zero bias on the output of
  the first MoE block, so its backward reaches exactly as deep as PERFT's (the lowest PERFT adapter sits beside
  that block) and it runs an optimizer step like the others.
- **Both depths are reported:** with input-embedding gradients (every setup, the reference included, is fed
  ``inputs_embeds.requires_grad_()`` and backpropagates through the whole network) and without (``input_ids``).
- **Interleaved repetitions:** every (variant, protocol) pair runs once per repetition, in an order rotated each
  time, so that a shared or throttling machine slows them alike.
- **The analytic FLOP floor** (``benchmarks/flops.py``) beside every measured ratio: what the ratio would be if
  time followed multiply-adds.

It prints ratios to the reference and writes JSON and Markdown under ``benchmarks/results/``, with the machine's
load average at the start and end (other jobs on a shared machine make every figure noisier).

    python benchmarks/olmoe_step.py                       # CPU shape, fp32 (what BENCHMARKS.md records)
    python benchmarks/olmoe_step.py --compile --variants frozen perft-r perft-e   # torch.compile'd, same protocol
    python benchmarks/olmoe_step.py --shape olmoe --device cuda --dtype bfloat16   # full OLMoE layer shape

Peak memory: on CUDA ``max_memory_allocated`` per variant; on CPU, where torch keeps no allocator statistics,
each variant runs alone in a child process that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
after building the model and reports the peak resident set size (``VmHWM``) over two training steps (without
input-embedding gradients), next to its resident size before them.

**Paired ratios decide the targets.** Repetition ``i`` of a variant and of the frozen reference ran close
together in time, so their ratio cancels a slow stretch of a shared machine; the verdict on each target comes from
the median of these per-repetition ratios and its 95% order-statistic interval (``benchmarks/paired.py``): met if
the whole interval is within the target, missed if it is all beyond, undecided otherwise. Ratios of the medians
and of the minima are printed beside them.

**The frozen experts' backward under compile.** Compiled in fp32, Transformers' ``grouped_mm`` experts call its
fallback operator, whose backward also computes (and drops) a gradient for every frozen expert weight; PERFT-E's
fused experts call does not (``peft_perft.dispatch.in_experts``), so against that reference its ratio mixes the
adapter's cost with a saving on the frozen part. ``--lean-frozen-experts`` gives every setup's frozen experts the
same lean backward (torch's grouped kernel through ``GroupedLinear`` where Transformers would fall back), so that a
ratio measures what the adapter adds.

**Dynamo's guards.** Before every call of a compiled forward, Dynamo checks its guards (the modules, attributes
and tensors the traced code read are still what it saw), on the host; a PEFT model has more modules and attributes
to check than the bare model, which a one-token decode step feels most. ``--skip-inbuilt-module-guards`` gives every
setup Dynamo's filter ``torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe``, which drops the guards on
torch.nn's own modules, so that the decode ratio with and without it shows how much of the difference is that host
check; the filter is unsafe for a model whose torch.nn modules change after compiling (a Dropout switched between
training and evaluation), so it is a diagnostic here.

**Clock.** ``--clock wall`` (default) times with ``time.perf_counter``. ``--clock cpu`` (needs ``--threads 1``)
times with ``time.process_time``, the CPU time of this process: time the process spends waiting for a core while
other jobs run is not counted, which makes it far less sensitive to a shared machine. It still counts what other
jobs do to this one's caches and memory bandwidth, and it is the single-thread cost, not the 2-thread wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.integrations import moe as transformers_moe

import peft_perft
from peft_perft.dispatch.in_experts import lean_grouped_mm

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import paired  # noqa: E402

SHAPES = {
    # OLMoE-1B-7B scaled down 4x in width (hidden 2048 -> 512, expert width 1024 -> 256, 16 -> 8 heads of 64),
    # with a vocabulary scaled so that the LM head keeps its ~10% share of the forward FLOPs.
    "cpu": {"hidden_size": 512, "intermediate_size": 256, "num_attention_heads": 8, "vocab_size": 4096},
    "olmoe": {"hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16, "vocab_size": 50304},
}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TARGETS = {"perft-r": 1.04, "perft-e": 1.08, "perft-d": 1.02, "perft-s": 1.02}  # step time over the reference's
DECODE_TARGETS = {"perft-r": 1.05, "perft-e": 1.05}
COMPILED_DECODE_TARGETS = {"perft-r": 1.03, "perft-e": 1.03}  # a compiled decode step has no per-kernel dispatch
LORA_EXPERTS_SPEEDUP_TARGET = 1.8
PROTOCOLS = {"embeds": True, "ids": False}
"""Protocol name -> whether every setup gets input-embedding gradients."""
RANK, R_EXPERTS, R_TOP_K = 16, 16, 4
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
COMPILED_ENTRIES = 64  # compiled-forward cache entries allowed: about 6 per setup (2 training protocols, decode)
"""--clock: wall time, or this process's CPU time (see the module docstring)."""


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
    routed = {"num_experts": R_EXPERTS, "top_k": R_TOP_K} if variant == "R" else {}
    return peft_perft.PerftConfig(variant=variant, r=RANK, lora_alpha=2 * RANK, dispatch_backend=backend, **routed)


def lora_experts_rank(config: OlmoeConfig, perft_e_parameters: int) -> int:
    """LoRA rank on the fused expert weights whose trainable-parameter count is closest to PERFT-E's.

    peft's LoRA on a 3-D (experts, d1, d2) parameter trains experts * r * (d1 + d2) values."""
    experts, hidden, width = config.num_experts, config.hidden_size, config.intermediate_size
    per_rank = config.num_hidden_layers * experts * ((2 * width + hidden) + (hidden + width))
    return max(1, round(perft_e_parameters / per_rank))


def variants(config: OlmoeConfig, names: list[str]) -> list[Variant]:
    """Variant specs; ``perft-r@dense`` style names force a dispatch backend."""
    perft_e_parameters = _perft_e_parameters(config)
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
    """One variant's model, optimizer and fixed batch; ``step`` is one full training step under a protocol."""

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
        if variant.config is None:
            trainable = [_depth_bias(model)]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        self.device = args.device
        self.compiled = args.compile
        self.clock = CLOCKS[args.clock]
        if args.compile:  # the transformer's forward, which both the training step and generate() call
            # PERFT and the frozen model must compile as one graph (a break fails the run rather than being timed).
            one_graph = variant.name == "frozen" or variant.name.startswith("perft")
            with torch.no_grad():  # Transformers installs its router-logits capturing hooks at the first call,
                self.model(input_ids=self.input_ids[:1, :8])  # under a lock that Dynamo cannot trace
            model.forward = torch.compile(model.forward, fullgraph=one_graph, **_compile_settings(args))
            # Every setup's model compiles the same forward code, and each (model, mode) pair adds its own entry to
            # that code's cache: past Dynamo's default limit of 8 the later setups silently ran eager. Raise the
            # limit, and fail rather than time an eager fallback.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_ENTRIES)
            torch._dynamo.config.fail_on_recompile_limit_hit = True

    def step(self, embedding_grads: bool) -> float:
        """Forward, backward and optimizer step; seconds. With ``embedding_grads`` the model is fed
        ``inputs_embeds.requires_grad_()``, so that the backward reaches the input embeddings."""
        _synchronize(self.device)
        start = self.clock()
        if embedding_grads:
            embeddings = self.model.get_input_embeddings()(self.input_ids).detach().requires_grad_()
            loss = self.model(inputs_embeds=embeddings, labels=self.input_ids).loss
        else:
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        return self.clock() - start

    @torch.no_grad()
    def decode_seconds_per_token(self, prompt_tokens: int, new_tokens: int) -> float:
        """Greedy generation with the KV cache: time of ``new_tokens`` steps minus the prefill and first token.

        Compiled, the cache is static: with the default dynamic cache every new length recompiles the decode step
        (until Dynamo's recompile limit sends it back to eager), which is what the time would then measure."""
        self.model.eval()
        prompt = self.input_ids[:1, :prompt_tokens]
        cache = {"cache_implementation": "static"} if self.compiled else {}

        def generate(count: int) -> float:
            _synchronize(self.device)
            start = self.clock()
            self.model.generate(
                input_ids=prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False, use_cache=True, **cache
            )
            _synchronize(self.device)
            return self.clock() - start

        seconds = (generate(new_tokens + 1) - generate(1)) / new_tokens
        self.model.train()
        return seconds


def _compile_settings(args: argparse.Namespace) -> dict:
    """torch.compile's mode; with ``--skip-inbuilt-module-guards`` the mode's Inductor options plus Dynamo's filter
    that drops its guards on torch.nn's own modules (torch.compile takes a mode or options, not both)."""
    if args.skip_inbuilt_module_guards:
        mode_options = torch._inductor.list_mode_options(args.compile_mode)
        return {"options": {**mode_options, "guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}}
    return {"mode": args.compile_mode}


class _BiasAfter(torch.nn.Module):
    """A block followed by a trainable zero bias (a module rather than a forward hook, so that compiled graphs
    contain it the same way)."""

    def __init__(self, block: torch.nn.Module, bias: torch.nn.Parameter) -> None:
        super().__init__()
        self.block, self.bias = block, bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block(hidden_states) + self.bias


def _depth_bias(model: OlmoeForCausalLM) -> torch.nn.Parameter:
    """A trainable zero bias on the first MoE block's output: the frozen reference's backward then reaches as deep
    as PERFT's (whose lowest adapter sits beside that block), and it has something to give the optimizer."""
    layer = model.model.layers[0]
    weight = model.model.embed_tokens.weight
    bias = torch.nn.Parameter(torch.zeros(weight.shape[1], device=weight.device, dtype=weight.dtype))
    layer.mlp = _BiasAfter(layer.mlp, bias)
    return bias


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(measures: dict[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Run every measurement once per repetition, rotating the order each time."""
    names = list(measures)
    results: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(measures[name]())
    return results


def peak_memory_mb(variant_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of training steps for one variant (see the module docstring for how)."""
    if args.device.startswith("cuda"):
        config = model_config(args.shape, args.layers)
        trainer = Trainer(variants(config, [variant_name])[0], config, args)
        trainer.step(False)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        trainer.step(False)
        peak = torch.cuda.max_memory_allocated() / 2**20
        del trainer
        torch.cuda.empty_cache()
        return {"resident_mb": before, "peak_mb": peak}
    command = [sys.executable, __file__, "--memory-child", variant_name, *_shape_arguments(args)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _shape_arguments(args: argparse.Namespace) -> list[str]:
    return [
        *(["--compile", f"--compile-mode={args.compile_mode}"] if args.compile else []),
        *(["--lean-frozen-experts"] if args.lean_frozen_experts else []),
        *(["--skip-inbuilt-module-guards"] if args.skip_inbuilt_module_guards else []),
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
    trainer.step(False)
    trainer.step(False)
    print(json.dumps({"resident_mb": resident, "peak_mb": _proc_status_mb("VmHWM")}))


def _proc_status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def floors(config: OlmoeConfig, name: str, args: argparse.Namespace) -> dict[str, float]:
    """The variant's analytic FLOP floors: a training step under each protocol, and a decode step."""
    base = name.partition("@")[0]
    adapter_experts = {"perft-r": R_EXPERTS, "perft-d": 2, "perft-s": 1}.get(base, 0)
    rank = lora_experts_rank(config, _perft_e_parameters(config)) if base == "lora-experts" else RANK
    shape = flops.method_shape(base, config, rank, adapter_experts, R_TOP_K)
    sequence = args.tokens // args.batch
    result = {
        f"step_floor_{protocol}": flops.step_floor(config, shape, args.tokens, sequence, embedding_grads)
        for protocol, embedding_grads in PROTOCOLS.items()
    }
    result["decode_floor"] = flops.decode_floor(config, shape, args.prompt_tokens + args.new_tokens / 2)
    return result


def _perft_e_parameters(config: OlmoeConfig) -> int:
    return config.num_hidden_layers * config.num_experts * 2 * RANK * config.hidden_size


def _ratio(times: dict[str, list[float]], name: str, reference: str, reduce) -> float:
    return reduce(times[name]) / reduce(times[reference])


def _paired(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """Median of the per-repetition ratios name / reference and its interval, as a JSON-ready dict."""
    return vars(paired.median_interval(paired.paired_ratios(times[name], times[reference])))


def _paired_ratios(name: str, step_times: dict, decode_times: dict) -> dict[str, dict[str, float]]:
    """A variant's paired ratios: step / frozen's per protocol, LoRA-experts' step / this, decode / frozen's."""
    row = {}
    for protocol in PROTOCOLS:
        key = f"{name}|{protocol}"
        row[f"step_vs_frozen_paired_{protocol}"] = _paired(step_times, key, f"frozen|{protocol}")
        if f"lora-experts|{protocol}" in step_times:
            row[f"lora_experts_over_this_paired_{protocol}"] = _paired(step_times, f"lora-experts|{protocol}", key)
    if decode_times.get("frozen"):
        row["decode_vs_frozen_paired"] = _paired(decode_times, name, "frozen")
    return row


def reanalyse(path: Path) -> str:
    """The targets table of an earlier run, recomputed from the raw repetitions its JSON file keeps."""
    summary = json.loads(path.read_text())
    steps, decodes = summary["raw_step_seconds"], summary["raw_decode_seconds_per_token"]
    for row in summary["rows"]:
        row.update(_paired_ratios(row["variant"], steps, decodes))
    return f"{TARGETS_HEADER}\n\n{target_table(targets(summary))}"


def summarize(config, trainers, step_times, decode_times, memory, load, args) -> dict:
    rows = []
    median = statistics.median
    for name, trainer in trainers.items():
        row = {"variant": name, "trainable_parameters": trainer.trainable_parameters if name != "frozen" else 0}
        row.update(floors(config, name, args) if name != "frozen" else {})
        for protocol in PROTOCOLS:
            key, reference = f"{name}|{protocol}", f"frozen|{protocol}"
            row[f"step_ms_median_{protocol}"] = median(step_times[key]) * 1e3
            row[f"step_vs_frozen_{protocol}"] = _ratio(step_times, key, reference, median)
            row[f"step_vs_frozen_of_minima_{protocol}"] = _ratio(step_times, key, reference, min)
            if f"lora-experts|{protocol}" in step_times:
                row[f"lora_experts_over_this_{protocol}"] = _ratio(step_times, f"lora-experts|{protocol}", key, median)
        if decode_times.get("frozen"):
            row["decode_ms_per_token"] = median(decode_times[name]) * 1e3
            row["decode_vs_frozen"] = _ratio(decode_times, name, "frozen", median)
            row["decode_vs_frozen_of_minima"] = _ratio(decode_times, name, "frozen", min)
        rows.append({**row, **_paired_ratios(name, step_times, decode_times), **memory[name]})
    return {
        "machine": _machine(args),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15min": load,
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
    load = summary["load_average_1_5_15min"]
    lines = [
        f"Machine: {summary['machine']}  ",
        f"Command: `{summary['command']}`  ",
        f"Load average (1/5/15 min) at start {load['start']}, at end {load['end']}  ",
        f"Clock: {summary['settings']['clock']}",
        "",
        "Step / frozen and decode / frozen: of the medians / of the minima [analytic FLOP floor].",
        "",
        "| variant | trainable params | step / frozen, with embedding grads | step / frozen, without | LoRA-experts "
        "step / this (with / without) | peak MB (resident before) | decode ms/token | decode / frozen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        steps = [_step_cell(row, protocol) for protocol in PROTOCOLS]
        speedups = [row.get(f"lora_experts_over_this_{protocol}") for protocol in PROTOCOLS]
        speedup = " / ".join(f"{value:.2f}x" for value in speedups) if all(speedups) else "-"
        memory = f"{row['peak_mb']:.0f} ({row['resident_mb']:.0f})" if "peak_mb" in row else "-"
        decode = "- | -"
        if "decode_vs_frozen" in row:
            floor = f" [{row['decode_floor']:.3f}]" if "decode_floor" in row else ""
            decode = (
                f"{row['decode_ms_per_token']:.2f} | {row['decode_vs_frozen']:.3f} / "
                f"{row['decode_vs_frozen_of_minima']:.3f}{floor}"
            )
        lines.append(
            f"| {row['variant']} | {row['trainable_parameters']:,} | {steps[0]} | {steps[1]} | {speedup} | "
            f"{memory} | {decode} |"
        )
    return "\n".join(lines) + "\n"


def _step_cell(row: dict, protocol: str) -> str:
    floor = f" [{row[f'step_floor_{protocol}']:.3f}]" if f"step_floor_{protocol}" in row else ""
    return (
        f"{row[f'step_vs_frozen_{protocol}']:.3f} / {row[f'step_vs_frozen_of_minima_{protocol}']:.3f}{floor} "
        f"({row[f'step_ms_median_{protocol}']:.0f} ms)"
    )


def targets(summary: dict) -> list[dict]:
    """Every target of the issue this run measured: the paired median and interval, and the verdict."""
    rows = {row["variant"]: row for row in summary["rows"]}
    found = []
    for protocol in PROTOCOLS:
        for name, limit in TARGETS.items():
            if name in rows:
                found.append(_target(f"{name} step [{protocol}]", "<=", limit, rows[name], f"_{protocol}"))
        for name, row in rows.items():
            if name.startswith("perft-") and f"lora_experts_over_this_paired_{protocol}" in row:
                found.append(
                    _target(
                        f"lora-experts step / {name} step [{protocol}]",
                        ">=",
                        LORA_EXPERTS_SPEEDUP_TARGET,
                        row,
                        f"_{protocol}",
                        key="lora_experts_over_this",
                    )
                )
    decode_targets = COMPILED_DECODE_TARGETS if summary.get("settings", {}).get("compile") else DECODE_TARGETS
    for name, limit in decode_targets.items():
        if name in rows and "decode_vs_frozen_paired" in rows[name]:
            found.append(_target(f"{name} decode", "<=", limit, rows[name], "", key="decode_vs_frozen"))
    return found


def _target(what: str, sense: str, limit: float, row: dict, suffix: str, key: str = "step_vs_frozen") -> dict:
    interval = paired.MedianInterval(**row[f"{key}_paired{suffix}"])
    judge = paired.verdict_at_most if sense == "<=" else paired.verdict_at_least
    return {
        "target": f"{what} {sense} {limit}",
        "paired": paired.describe(interval),
        "coverage": interval.coverage,
        "of_medians": row[f"{key}{suffix}"],
        "verdict": judge(interval, limit),
    }


TARGETS_HEADER = (
    "Targets: median of the per-repetition (paired) ratios, [order-statistic interval] with its coverage; "
    "met if the whole interval is within the target, missed if it is all beyond, else undecided."
)


def target_table(found: list[dict]) -> str:
    """Markdown table of the targets: paired median [interval], ratio of the medians, verdict."""
    lines = [
        "| target | paired median [interval] | coverage | ratio of medians | verdict |",
        "|---|---|---:|---:|---|",
        *(
            f"| {t['target']} | {t['paired']} | {t['coverage']:.3f} | {t['of_medians']:.3f} | {t['verdict']} |"
            for t in found
        ),
    ]
    return "\n".join(lines) + "\n"


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
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time (--threads 1)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (training and decode)")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU; on a CPU as default)",
    )
    parser.add_argument(
        "--lean-frozen-experts",
        action="store_true",
        help="with --compile: no frozen expert weight gradients in any setup (see the module docstring)",
    )
    parser.add_argument(
        "--skip-inbuilt-module-guards",
        action="store_true",
        help="with --compile: Dynamo skips its guards on torch.nn's own modules in every setup (see the module "
        "docstring; a diagnostic of the per-call host cost, not a setting to train with)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory runs (faster, for exploring)")
    parser.add_argument("--skip-decode", action="store_true", help="no decode-latency runs (faster, for exploring)")
    parser.add_argument("--output", type=Path, default=None, help="path stem; default benchmarks/results/<shape>_...")
    parser.add_argument(
        "--reanalyse", type=Path, default=None, help="print the targets of an earlier run's JSON file, run nothing"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lean_frozen_experts and not args.compile:
        parser.error("--lean-frozen-experts changes only compiled experts: add --compile, or drop it.")
    if args.skip_inbuilt_module_guards and not args.compile:
        parser.error("--skip-inbuilt-module-guards changes only compiled code: add --compile, or drop it.")
    if args.clock == "cpu" and args.threads != 1:
        parser.error(
            f"--clock cpu needs --threads 1 (got {args.threads}): with more threads the OpenMP workers' "
            "busy-waiting counts as CPU time, and the figure is neither the work nor the wall time."
        )
    return args


def main() -> None:
    args = parse_arguments()
    if args.reanalyse:
        print(reanalyse(args.reanalyse))
        return
    torch.set_num_threads(args.threads)
    if args.lean_frozen_experts:  # before any model is built: the memory children build theirs too
        lean_frozen_experts()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    if "frozen" not in args.variants:
        args.variants.insert(0, "frozen")
    load = {"start": _load_average()}
    config = model_config(args.shape, args.layers)
    trainers = {variant.name: Trainer(variant, config, args) for variant in variants(config, args.variants)}
    measures = {
        f"{name}|{protocol}": functools.partial(trainer.step, embedding_grads)
        for name, trainer in trainers.items()
        for protocol, embedding_grads in PROTOCOLS.items()
    }
    for measure in measures.values():  # warm-up: allocator, optimizer state, lazy imports, compilation
        measure()
    step_times = interleaved(measures, args.repetitions)
    decode_repetitions = 0 if args.skip_decode else args.decode_repetitions
    decoders = {
        name: functools.partial(trainer.decode_seconds_per_token, args.prompt_tokens, args.new_tokens)
        for name, trainer in trainers.items()
    }
    if decode_repetitions:
        for decode in decoders.values():  # warm-up (and, compiled, the decode graphs)
            decode()
    decode_times = interleaved(decoders, decode_repetitions)
    memory = {name: {} if args.skip_memory else peak_memory_mb(name, args) for name in trainers}
    load["end"] = _load_average()
    summary = summarize(config, trainers, step_times, decode_times, memory, load, args)
    compiled = "_compiled" if args.compile else ""
    default_stem = f"olmoe_{args.shape}_{args.device.split(':')[0]}_{args.dtype}{compiled}"
    stem = args.output or Path("benchmarks/results") / default_stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(summary)
    found = targets(summary)
    summary["targets"] = found
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    stem.with_suffix(".md").write_text(f"{table}\n{TARGETS_HEADER}\n\n{target_table(found)}")
    print(table)
    print(f"{TARGETS_HEADER}\n\n{target_table(found)}")


def lean_frozen_experts() -> None:
    """Every setup's compiled frozen experts (the frozen reference included) take PERFT-E's fused call's grouped
    product for its frozen projections, `in_experts.lean_grouped_mm`, where Transformers would call its fallback
    operator: no gradient for a frozen weight."""
    transformers_grouped_mm = transformers_moe._grouped_mm

    def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        output = lean_grouped_mm(input, weight, offs)
        return transformers_grouped_mm(input, weight, offs) if output is None else output

    transformers_moe._grouped_mm = grouped_mm


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
