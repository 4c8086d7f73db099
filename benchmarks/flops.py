"""Analytic FLOP floors: the least time ratio to the frozen model a training method can reach if time follows FLOPs.

Counts multiply-adds of the OLMoE-shaped benchmark model per training step. The frozen reference runs the forward
and, over the layers it backpropagates through, the input gradients (about one forward's work for every matmul;
attention's score and value products twice, dQ/dK and dV/dP). An adapter adds its forward, its weight gradients
(one forward's work) and, in every layer whose input needs a gradient, its input gradients (one more). The floor
is (frozen + method) / frozen: what the method would cost if every extra multiply-add ran as fast as the frozen
model's and nothing else (sorting, gathers, kernel launches) cost anything.

Backpropagation depth is one of the two benchmark protocols: with input-embedding gradients every layer is
backpropagated through; without, the frozen reference and PERFT stop at the first MoE block's output (the lowest
point a PERFT adapter needs), layer 0's attention and experts are never differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import OlmoeConfig


@dataclass(frozen=True)
class MethodShape:
    """What a training method adds per token and layer, in multiply-adds of its forward."""

    per_token_layer: float
    per_layer: float = 0.0
    """Work independent of the token count (peft's LoRA on expert weights merges delta-W = B A every forward)."""
    differentiates_layer0: bool = False
    """Whether the method needs gradients inside layer 0 (LoRA on layer 0's attention or experts)."""
    base_weight_gradients: float = 0.0
    """Per token and layer: gradients of frozen weights the method's formulation forces (merged LoRA)."""


def frozen_forward_per_layer(config: OlmoeConfig, context: float) -> dict[str, float]:
    """Multiply-adds of one token through one decoder layer, by part (``context``: mean attended length)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    projections = hidden * heads * head_dim * 2 + hidden * config.num_key_value_heads * head_dim * 2
    return {
        "attention_projections": projections,
        "attention_scores": 2 * context * heads * head_dim,
        "router": hidden * config.num_experts,
        "experts": config.num_experts_per_tok * 3 * hidden * config.intermediate_size,
    }


def frozen_step(config: OlmoeConfig, tokens: int, sequence: int, embedding_grads: bool) -> float:
    """Multiply-adds of the frozen reference's training step (forward + input gradients to the protocol's depth)."""
    parts = frozen_forward_per_layer(config, (sequence + 1) / 2)
    layer_forward = sum(parts.values())
    layer_backward = layer_forward + parts["attention_scores"]
    head = config.hidden_size * config.vocab_size
    layers = config.num_hidden_layers
    backpropagated = layers if embedding_grads else layers - 1
    return tokens * (layers * layer_forward + head + backpropagated * layer_backward + head)


def method_step(config: OlmoeConfig, method: MethodShape, tokens: int, sequence: int, embedding_grads: bool) -> float:
    """Multiply-adds a method adds to the frozen reference's step."""
    layers = config.num_hidden_layers
    input_gradient_layers = layers if embedding_grads else layers - 1
    extra = tokens * method.per_token_layer * (2 * layers + input_gradient_layers)
    extra += 3 * layers * method.per_layer  # the merge, and its two gradients (delta-W to A and to B)
    extra += tokens * layers * method.base_weight_gradients
    if method.differentiates_layer0 and not embedding_grads:
        parts = frozen_forward_per_layer(config, (sequence + 1) / 2)
        extra += tokens * (sum(parts.values()) + parts["attention_scores"])
    return extra


def method_shape(name: str, config: OlmoeConfig, rank: int, adapter_experts: int, adapter_top_k: int) -> MethodShape:
    """The per-token work of a benchmark variant (names as in olmoe_step.py, without '@backend')."""
    hidden, width, experts = config.hidden_size, config.intermediate_size, config.num_experts
    bottleneck = 2 * rank * hidden
    if name == "frozen":
        return MethodShape(hidden)  # the zero bias at the first MoE block's output: one add per value
    if name == "perft-r":
        return MethodShape(adapter_experts * hidden + adapter_top_k * bottleneck)
    if name == "perft-e":
        return MethodShape(config.num_experts_per_tok * bottleneck)
    if name in ("perft-d", "perft-s"):
        return MethodShape(adapter_experts * bottleneck)
    if name == "lora-attn":
        head_dim = hidden // config.num_attention_heads
        return MethodShape(2 * rank * hidden + rank * (hidden + config.num_key_value_heads * head_dim), 0.0, True)
    if name == "lora-experts":
        merge = experts * rank * (2 * width * hidden + hidden * width)
        return MethodShape(0.0, merge, True, config.num_experts_per_tok * 3 * hidden * width)
    raise ValueError(f"No FLOP model for variant {name!r}.")


def step_floor(config: OlmoeConfig, method: MethodShape, tokens: int, sequence: int, embedding_grads: bool) -> float:
    """(frozen + method) / frozen for one training step; the frozen reference's own zero bias is not counted."""
    frozen = frozen_step(config, tokens, sequence, embedding_grads)
    return 1 + method_step(config, method, tokens, sequence, embedding_grads) / frozen


def decode_floor(config: OlmoeConfig, method: MethodShape, context: float) -> float:
    """(frozen + method) / frozen for one decode step with the KV cache (forward only, one token)."""
    parts = frozen_forward_per_layer(config, context)
    frozen = config.num_hidden_layers * sum(parts.values()) + config.hidden_size * config.vocab_size
    extra = config.num_hidden_layers * (method.per_token_layer + method.per_layer)
    return 1 + extra / frozen
