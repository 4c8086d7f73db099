"""The demo's report: the adapter as applied, the run's peak memory, and the summary printed at the end."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from peft import PeftModel

from peft_perft.layer import PerftMoeBlock


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
