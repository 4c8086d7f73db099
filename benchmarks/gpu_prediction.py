"""Roofline predictions of PERFT's overhead on one H200, per flagship shape and variant: arithmetic, not a measurement.

Each flagship is built from Transformers' default config of its type on the meta device (no memory, no download);
PERFT's block detector finds its MoE blocks, and the frozen model's parameters are counted from the real modules:
all of them, and those a token activates (the routed experts' 3-D weights count K of N). The adapter's parameters
follow the formulas of docs/variants.md. Per token, a matmul costs 2 FLOPs per weight it multiplies; attention
scores, norms, softmax and the optimizer's arithmetic are left out on both sides (they add to the frozen model's
time, so the overheads below are upper bounds of what the counted work predicts).

Training step (``--tokens`` per step, every expert touched): the frozen model runs its forward and the input
gradients (4 FLOPs per active weight and token) and reads its bf16 weights twice; the adapter adds its forward,
input and weight gradients (6 FLOPs per active adapter weight and token) and moves its fp32 weights, gradients and
AdamW moments (44 bytes per adapter parameter: weights read twice, gradient written and read, AdamW reading and
writing weight, moments and gradient). Decode (one token, batch 1): each side reads the weights a token uses, bf16
for the frozen model and fp32 for the adapter (peft's default dtype for adapters on a bf16 base). Each side's time
is max(FLOPs / peak, bytes / bandwidth); the overhead is (frozen + adapter) / frozen. Kernel launches and host
synchronisation, which decide decode on a GPU, are not in this model.

    python benchmarks/gpu_prediction.py [--rank 8] [--tokens 16384]   # the Markdown table of docs/performance.md
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from peft_perft.architectures import find_moe_blocks

H200_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H200 SXM (no sparsity), FLOP/s."""
H200_BYTES_PER_SECOND = 4.8e12
"""HBM3e bandwidth of an H200 SXM, bytes/s."""
FROZEN_BYTES = 2  # bf16
ADAPTER_BYTES = 4  # fp32 adapter weights (peft's autocast_adapter_dtype)
ADAPTER_STEP_BYTES = 44
"""fp32 adapter bytes moved per parameter in a training step: weight read in forward and backward (8), gradient
written and read (8), AdamW reading weight, gradient and both moments and writing weight and moments (28)."""
FLAGSHIPS = ("olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "glm4_moe", "llama4_text")
"""Transformers model types; the shape of each is its config class's defaults (DeepSeek-V3, Mixtral-8x7B and
gpt-oss-120b are published models with those shapes; OLMoE's and Qwen3-MoE's defaults are wider or shallower than
OLMoE-1B-7B and Qwen3-30B-A3B)."""


@dataclass(frozen=True)
class FlagshipCounts:
    """Weights of one flagship: all of them, those one token activates, and the shape of its MoE blocks."""

    total: int
    active: int
    moe_blocks: int
    hidden_size: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class AdapterCounts:
    total: int
    active: int


def flagship_counts(model_type: str) -> FlagshipCounts:
    """Count the default-config model's weights on the meta device."""
    return config_counts(CONFIG_MAPPING[model_type]())


def config_counts(config: PretrainedConfig) -> FlagshipCounts:
    """Count the weights of a causal LM of this config, built on the meta device (any size, no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    blocks = find_moe_blocks(model)
    inactive = 0
    for name, spec in blocks.items():
        experts = model.get_submodule(".".join(part for part in (name, spec.experts_name) if part))
        routed = sum(p.numel() for p in experts.parameters(recurse=False) if p.dim() == 3)
        inactive += routed - routed * spec.top_k // spec.num_experts
    spec = next(iter(blocks.values()))
    return FlagshipCounts(total, total - inactive, len(blocks), spec.hidden_size, spec.num_experts, spec.top_k)


def adapter_counts(
    flagship: FlagshipCounts, variant: str, rank: int, routed: int, top_k: int, dense: int
) -> AdapterCounts:
    """docs/variants.md's trainable parameters per block, times the blocks; ``active``: those one token uses."""
    expert = 2 * flagship.hidden_size * rank
    experts, used = {"R": (routed, top_k), "E": (flagship.num_experts, flagship.top_k), "D": (dense, dense)}.get(
        variant, (1, 1)
    )
    router = routed * flagship.hidden_size if variant == "R" else 0
    return AdapterCounts(
        total=flagship.moe_blocks * (experts * expert + router), active=flagship.moe_blocks * (used * expert + router)
    )


def roofline_seconds(flops: float, moved_bytes: float) -> float:
    return max(flops / H200_BF16_FLOPS, moved_bytes / H200_BYTES_PER_SECOND)


def step_overhead(flagship: FlagshipCounts, adapter: AdapterCounts, tokens: int) -> float:
    frozen = roofline_seconds(4 * flagship.active * tokens, 2 * FROZEN_BYTES * flagship.total)
    added = roofline_seconds(6 * adapter.active * tokens, ADAPTER_STEP_BYTES * adapter.total)
    return (frozen + added) / frozen


def decode_overhead(flagship: FlagshipCounts, adapter: AdapterCounts) -> float:
    frozen = roofline_seconds(2 * flagship.active, FROZEN_BYTES * flagship.active)
    added = roofline_seconds(2 * adapter.active, ADAPTER_BYTES * adapter.active)
    return (frozen + added) / frozen


def markdown(rank: int, tokens: int, routed: int, top_k: int, dense: int) -> str:
    lines = [
        f"| model type (default config) | frozen params (active) | variant | adapter params (active) | adapter FLOPs / "
        f"frozen, step | predicted step overhead ({tokens} tokens) | predicted decode overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_type in FLAGSHIPS:
        flagship = flagship_counts(model_type)
        for variant in ("R", "E", "D", "S"):
            adapter = adapter_counts(flagship, variant, rank, routed, top_k, dense)
            flop_share = 6 * adapter.active / (4 * flagship.active)
            lines.append(
                f"| `{model_type}` | {flagship.total / 1e9:.1f}B ({flagship.active / 1e9:.2f}B) | {variant} | "
                f"{adapter.total / 1e6:,.1f}M ({adapter.active / 1e6:,.2f}M) | {flop_share:.2%} | "
                f"{step_overhead(flagship, adapter, tokens):.3f}x | {decode_overhead(flagship, adapter):.3f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per training step on the GPU")
    parser.add_argument("--routed-experts", type=int, default=8, help="PERFT-R's adapter experts N")
    parser.add_argument("--top-k", type=int, default=2, help="PERFT-R's active adapter experts K")
    parser.add_argument("--dense-experts", type=int, default=2, help="PERFT-D's adapter experts N")
    args = parser.parse_args()
    print(markdown(args.rank, args.tokens, args.routed_experts, args.top_k, args.dense_experts))


if __name__ == "__main__":
    main()
