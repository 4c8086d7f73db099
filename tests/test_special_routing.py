"""PERFT on MoE blocks with special routing, checked against references written here from the models' papers.

Each test builds a tiny model whose router does something beyond softmax-top-k (sigmoid scores with a
score-correction bias and group-limited choice, router biases, a routed scaling applied after the experts, zero-compute
experts, a gated shared expert, hybrid Mamba layers), runs one adapted MoE block on random hidden states, and compares
it with ``frozen block + reference adapter``. The reference routing is recomputed from the router's weights with the
formulas of each model; the reference adapter is a per-token loop over ``B_i act(A_i h)``. So a PERFT-E that read
other weights than the experts receive, or a PERFT-R/D/S not parallel to the whole block (shared experts included),
fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt_oss_config
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    JambaConfig,
    JetMoeConfig,
    LagunaConfig,
    Llama4TextConfig,
    LongcatFlashConfig,
    Qwen2MoeConfig,
)

from peft_perft import PerftConfig, PerftMoeBlock

TOKENS = {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}
HIDDEN = 32
RANK, ALPHA = 4, 8
SCALING = ALPHA / RANK


def perft(variant: str, **overrides) -> PerftConfig:
    """A PERFT config with random B, so that the adapter's contribution is visible."""
    sizes = {"R": {"num_experts": 3, "top_k": 2}, "D": {"num_experts": 2}}.get(variant, {})
    return PerftConfig(variant=variant, r=RANK, lora_alpha=ALPHA, init_weights=False, **sizes, **overrides)


def adapted_blocks(model: torch.nn.Module, config: PerftConfig) -> dict[str, PerftMoeBlock]:
    peft_model = get_peft_model(model, config).eval()
    return {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, PerftMoeBlock)}


def hidden_states(tokens: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, tokens // 2, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_adapter(
    flat: torch.Tensor, block: PerftMoeBlock, index: torch.Tensor, weight: torch.Tensor, silu: bool = False
) -> torch.Tensor:
    """sum_k weight[t, k] * scaling * B_i act(A_i h_t), one token and one expert at a time."""
    lora_A, lora_B = block.perft_A["default"], block.perft_B["default"]
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for slot in range(index.shape[1]):
            expert = int(index[token, slot])
            down = lora_A[expert] @ flat[token]
            out[token] += weight[token, slot] * SCALING * (lora_B[expert] @ (F.silu(down) if silu else down))
    return out


def always_on_reference(flat: torch.Tensor, block: PerftMoeBlock) -> torch.Tensor:
    experts = block.perft_A["default"].shape[0]
    every = torch.arange(experts).expand(flat.shape[0], experts)
    return reference_adapter(flat, block, every, torch.ones(every.shape))


def reference_perft_router(flat: torch.Tensor, block: PerftMoeBlock, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PERFT-R's routing: softmax over the adapter router's logits, top-k, renormalised."""
    probs = torch.softmax(flat @ block.perft_router["default"].t(), dim=-1)
    weight, index = probs.topk(top_k, dim=-1)
    return index, weight / weight.sum(dim=-1, keepdim=True)


def primary(output):
    return output[0] if isinstance(output, tuple) else output


def assert_block_matches(block: PerftMoeBlock, x: torch.Tensor, reference_delta: torch.Tensor) -> None:
    """The adapted block's output equals the frozen block's plus the reference adapter output."""
    with torch.no_grad():
        adapted = primary(block(x))
        frozen = primary(block.base_layer(x))
    torch.testing.assert_close(adapted, frozen + reference_delta.view(frozen.shape), rtol=1e-5, atol=1e-5)
    assert reference_delta.abs().max() > 1e-3


def assert_records_match(block: PerftMoeBlock, index: torch.Tensor, weight: torch.Tensor) -> None:
    """PERFT-E recorded exactly the experts and weights of the reference routing (slot order aside)."""
    record = block.routing_records["default"]
    order, reference_order = record.expert_index.argsort(dim=-1), index.argsort(dim=-1)
    torch.testing.assert_close(record.expert_index.gather(1, order), index.gather(1, reference_order))
    torch.testing.assert_close(record.expert_weight.gather(1, order), weight.gather(1, reference_order))


def randomise_router(router: torch.nn.Module, seed: int, bias_scale: float = 0.0) -> None:
    """Spread the router's logits (and its correction bias), so that no top-k choice is a near tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = router.weight if hasattr(router, "weight") else router.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        if bias_scale:
            bias = router.e_score_correction_bias
            bias.copy_(bias_scale * torch.randn(bias.shape, generator=generator))


# DeepSeek-V3: sigmoid scores, bias-corrected group-limited choice, weights renormalised then scaled.


def deepseek_v3_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = DeepseekV3Config(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    )
    return AutoModelForCausalLM.from_config(config)


def deepseek_v3_routing(flat: torch.Tensor, gate: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; choose among the top groups (group score = sum of its two best biased scores); the weights
    are the unbiased scores of the chosen experts, renormalised and times routed_scaling_factor."""
    scores = torch.sigmoid(flat @ gate.weight.t())
    biased = scores + gate.e_score_correction_bias
    groups = biased.view(flat.shape[0], 4, 2)
    group_score = groups.topk(2, dim=-1).values.sum(dim=-1)
    kept_groups = group_score.topk(2, dim=-1).indices
    allowed = torch.zeros(flat.shape[0], 4, dtype=torch.bool).scatter(1, kept_groups, True)
    biased = biased.masked_fill(~allowed.repeat_interleave(2, dim=1), float("-inf"))
    index = biased.topk(2, dim=-1).indices
    weight = scores.gather(1, index)
    return index, 2.5 * weight / weight.sum(dim=-1, keepdim=True)


def test_deepseek_v3_perft_e_uses_the_corrected_group_limited_scaled_routing():
    model = deepseek_v3_model()
    randomise_router(model.model.layers[1].mlp.gate, seed=1, bias_scale=0.5)
    blocks = adapted_blocks(model, perft("E"))
    assert list(blocks) == ["model.layers.1.mlp"], "the first (dense) layer must not be adapted"
    block, x = blocks["model.layers.1.mlp"], hidden_states()
    flat = x.reshape(-1, HIDDEN)
    index, weight = deepseek_v3_routing(flat, block.base_layer.gate)
    plain_top = torch.sigmoid(flat @ block.base_layer.gate.weight.t()).topk(2, dim=-1).indices
    assert not torch.equal(index.sort(dim=-1).values, plain_top.sort(dim=-1).values), "bias and groups must matter"
    assert_block_matches(block, x, reference_adapter(flat, block, index, weight))
    assert_records_match(block, index, weight)


@pytest.mark.parametrize("variant", ["R", "D", "S"])
def test_deepseek_v3_block_variants_sit_beside_the_whole_block(variant: str):
    """R, D and S add to the block output, shared expert included, with their own routing or none."""
    model = deepseek_v3_model()
    block = adapted_blocks(model, perft(variant))["model.layers.1.mlp"]
    x = hidden_states()
    flat = x.reshape(-1, HIDDEN)
    if variant == "R":
        delta = reference_adapter(flat, block, *reference_perft_router(flat, block, top_k=2))
    else:
        delta = always_on_reference(flat, block)
    assert_block_matches(block, x, delta)


# Qwen2-MoE: softmax top-k without renormalisation, plus a sigmoid-gated shared expert.


def qwen2_moe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("variant", ["E", "R", "S"])
def test_qwen2_moe_with_gated_shared_expert(variant: str):
    model = qwen2_moe_model()
    randomise_router(model.model.layers[1].mlp.gate, seed=2)
    blocks = adapted_blocks(model, perft(variant, adapter_type="parallel_adapter"))
    assert list(blocks) == ["model.layers.1.mlp"], "mlp_only_layers are dense and stay unadapted"
    block, x = blocks["model.layers.1.mlp"], hidden_states()
    flat = x.reshape(-1, HIDDEN)
    if variant == "E":
        weight, index = torch.softmax(flat @ block.base_layer.gate.weight.t(), dim=-1).topk(2, dim=-1)
        assert_block_matches(block, x, reference_adapter(flat, block, index, weight, silu=True))
        assert_records_match(block, index, weight)
    elif variant == "R":
        index, weight = reference_perft_router(flat, block, top_k=2)
        assert_block_matches(block, x, reference_adapter(flat, block, index, weight, silu=True))
    else:
        every = torch.zeros(flat.shape[0], 1, dtype=torch.long)
        assert_block_matches(block, x, reference_adapter(flat, block, every, torch.ones(every.shape), silu=True))


# GPT-OSS: router with a bias, softmax over the top-k logits only, experts with transposed weights and biases,
# and a block that returns (hidden_states, router_scores).


def test_gpt_oss_routing_with_router_bias_and_tuple_output():
    torch.manual_seed(0)
    config = tiny_gpt_oss_config(max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    router = model.model.layers[0].mlp.router
    randomise_router(router, seed=3)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([1.5, -1.0, 0.5, -2.0]))
    block = adapted_blocks(model, perft("E"))["model.layers.0.mlp"]
    x = hidden_states()
    flat = x.reshape(-1, HIDDEN)
    top_logits, index = (flat @ router.weight.t() + router.bias).topk(2, dim=-1)
    weight = torch.softmax(top_logits, dim=-1)
    assert_block_matches(block, x, reference_adapter(flat, block, index, weight))
    assert_records_match(block, index, weight)
    with torch.no_grad():
        adapted, frozen = block(x), block.base_layer(x)
    assert isinstance(adapted, tuple) and len(adapted) == len(frozen)
    torch.testing.assert_close(adapted[1], frozen[1])


# Jamba: Mamba layers mixed with attention, MoE only every other layer.


def test_jamba_adapts_only_expert_layers_and_counts_model_layers():
    torch.manual_seed(0)
    config = JambaConfig(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=0,
        mamba_d_state=4,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert set(adapted_blocks(AutoModelForCausalLM.from_config(config), perft("S"))) == {
        "model.layers.1.feed_forward",
        "model.layers.3.feed_forward",
    }
    randomise_router(model.model.layers[3].feed_forward.router, seed=4)
    blocks = adapted_blocks(model, perft("E", layers_to_transform=[3]))
    assert list(blocks) == ["model.layers.3.feed_forward"]
    block, x = blocks["model.layers.3.feed_forward"], hidden_states()
    flat = x.reshape(-1, HIDDEN)
    weight, index = torch.softmax(flat @ block.base_layer.router.weight.t(), dim=-1).topk(2, dim=-1)
    assert_block_matches(block, x, reference_adapter(flat, block, index, weight))
    with pytest.raises(ValueError):
        get_peft_model(AutoModelForCausalLM.from_config(config), perft("S", layers_to_transform=[2]))


# Laguna: sigmoid routing with a correction bias, and routed_scaling_factor applied AFTER the experts call.


def test_laguna_scaling_after_the_experts_call_scales_perft_e_too():
    """y' = rsf * sum_i g_i (E_i + dE_i): the adapter gets the same post-call scaling as the experts."""
    torch.manual_seed(0)
    config = LagunaConfig(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        head_dim=8,
        num_hidden_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_layer_types=["sparse"],
        moe_routed_scaling_factor=3.0,
    )
    model = AutoModelForCausalLM.from_config(config)
    gate = model.model.layers[0].mlp.gate
    randomise_router(gate, seed=5, bias_scale=0.3)
    block = adapted_blocks(model, perft("E"))["model.layers.0.mlp"]
    x = hidden_states()
    flat = x.reshape(-1, HIDDEN)
    scores = torch.sigmoid(flat @ gate.weight.t())
    index = (scores + gate.e_score_correction_bias).topk(2, dim=-1).indices
    weight = scores.gather(1, index)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    assert_block_matches(block, x, 3.0 * reference_adapter(flat, block, index, weight))
    assert_records_match(block, index, weight)


# LongCat-Flash: zero-compute (identity) experts among the routed slots carry no PERFT-E adapter.


def test_longcat_zero_experts_get_no_adapter():
    torch.manual_seed(0)
    config = LongcatFlashConfig(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        num_layers=1,
        ffn_hidden_size=32,
        expert_ffn_hidden_size=16,
        n_routed_experts=4,
        zero_expert_num=2,
        moe_topk=2,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
        routed_scaling_factor=2.0,
    )
    model = AutoModelForCausalLM.from_config(config)
    router = model.model.layers[0].mlp.router
    randomise_router(router, seed=6)
    block = adapted_blocks(model, perft("E"))["model.layers.0.mlp"]
    assert block.perft_A["default"].shape[0] == 4, "one adapter per weighted expert, none for the zero experts"
    x = hidden_states(tokens=16)
    flat = x.reshape(-1, HIDDEN)
    scores = torch.softmax(flat @ router.classifier.weight.t(), dim=-1)
    index = (scores + router.e_score_correction_bias).topk(2, dim=-1).indices
    weight = 2.0 * scores.gather(1, index)
    assert (index >= 4).any() and (index < 4).any(), "the input must route to both kinds of experts"
    weighted = index < 4
    delta = reference_adapter(flat, block, index.where(weighted, 0), weight.where(weighted, 0.0))
    assert_block_matches(block, x, delta)


# Llama 4: sigmoid of the top-k logits, multiplied into the experts' INPUT; the experts run on every (expert, token)
# and are called without the routing, so PERFT-E reads it from the router's output.


def assert_perft_e_follows_the_reference_routing(block: PerftMoeBlock, x: torch.Tensor, reference) -> torch.Tensor:
    """The reference reproduces the frozen block's output (so its routing is the block's), and PERFT-E adds the
    reference adapter with that routing and records it; returns the reference's expert indices."""
    flat = x.reshape(-1, HIDDEN)
    with torch.no_grad():
        index, weight, routed_output = reference(flat, block.base_layer)
        frozen = primary(block.base_layer(x)).reshape(flat.shape)
    torch.testing.assert_close(frozen, routed_output, rtol=1e-5, atol=1e-5)
    assert_block_matches(block, x, reference_adapter(flat, block, index, weight))
    assert_records_match(block, index, weight)
    return index


def llama4_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Llama4TextConfig(
        **TOKENS,
        **ATTENTION,
        hidden_size=HIDDEN,
        intermediate_size=16,
        intermediate_size_mlp=32,
        head_dim=8,
        num_hidden_layers=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(config)


def llama4_reference(flat: torch.Tensor, moe: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, weights, block output): top-k of the router logits with sigmoid scores s, and
    shared(h) + sum_k E_k(s_k h), each expert a SwiGLU on its own (H, 2I) / (I, H) matrices."""
    top_logits, index = (flat @ moe.router.weight.t()).topk(2, dim=-1)
    weight = torch.sigmoid(top_logits)
    out = moe.shared_expert(flat)
    for token in range(flat.shape[0]):
        for slot in range(2):
            expert = int(index[token, slot])
            gate, up = (weight[token, slot] * flat[token] @ moe.experts.gate_up_proj[expert]).chunk(2)
            out[token] = out[token] + (up * F.silu(gate)) @ moe.experts.down_proj[expert]
    return index, weight, out


def test_llama4_perft_e_reads_the_routing_its_block_applies():
    model = llama4_model()
    randomise_router(model.model.layers[0].feed_forward.router, seed=7)
    block = adapted_blocks(model, perft("E"))["model.layers.0.feed_forward"]
    assert_perft_e_follows_the_reference_routing(block, hidden_states(), llama4_reference)


# JetMoE: softmax over the top-k logits; the experts are called with the (token, slot) pairs sorted by expert and
# the per-expert counts, so PERFT-E rebuilds the per-token routing from the router's sorted output.


def jetmoe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = JetMoeConfig(
        **TOKENS,
        hidden_size=HIDDEN,
        intermediate_size=16,
        num_hidden_layers=1,
        num_key_value_heads=4,
        kv_channels=8,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(config)


def jetmoe_reference(flat: torch.Tensor, moe: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, weights, block output): softmax over the top-k logits, and bias + sum_k g_k E_k(h), each expert a
    SwiGLU whose stacked (2I, H) input and (H, I) output matrices are applied one token at a time."""
    top_logits, index = (flat @ moe.router.layer.weight.t()).topk(2, dim=-1)
    weight = torch.softmax(top_logits, dim=-1)
    out = moe.bias.expand_as(flat).clone()
    for token in range(flat.shape[0]):
        for slot in range(2):
            expert = int(index[token, slot])
            gate, up = (moe.input_linear.weight[expert] @ flat[token]).chunk(2)
            out[token] += weight[token, slot] * (moe.output_linear.weight[expert] @ (F.silu(gate) * up))
    return index, weight, out


def test_jetmoe_perft_e_rebuilds_the_routing_of_its_grouped_experts():
    model = jetmoe_model()
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.router.layer.weight.copy_(
            torch.randn(moe.router.layer.weight.shape, generator=torch.Generator().manual_seed(8))
        )
        moe.bias.normal_()
    block = adapted_blocks(model, perft("E"))["model.layers.0.mlp"]
    index = assert_perft_e_follows_the_reference_routing(block, hidden_states(tokens=16), jetmoe_reference)
    assert len(set(index.flatten().tolist())) == 4, "the tokens must reach every expert, so groups are non-trivial"
