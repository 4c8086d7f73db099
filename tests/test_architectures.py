"""Coverage of PERFT-R, -E, -D and -S over every MoE causal-LM architecture of the installed Transformers.

The architectures come from Transformers itself (the causal-LM auto mapping), and one counts as MoE when its config
class declares an expert count. That is independent of PERFT's block detector, so an MoE model the detector misses
fails here instead of silently dropping out. Each architecture is built from a shrunk config (no network), gets
every variant, runs forward and backward, must train only adapter tensors, and must survive a save / load round
trip. ``scripts/support_matrix.py`` runs this file and writes its outcome to ``docs/support_matrix.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import tempfile

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.architectures import find_moe_blocks

VARIANTS = ("R", "E", "D", "S")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k")
SHARED_EXPERT_FIELDS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
TINY_EXPERTS, TINY_TOP_K, TINY_HIDDEN = 4, 2, 32
TINY_SIZES = {
    "vocab_size": 64,
    "hidden_size": TINY_HIDDEN,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "shared_experts_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16,
    "expert_ffn_hidden_size": 16,
    "ffn_hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "global_head_dim": 8,
    "max_position_embeddings": 64,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "o_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "first_k_dense_replace": 1,
    "vocab_size_per_layer_input": 64,
    "hidden_size_per_layer_input": 8,
    "router_hidden_size": 16,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "mamba_num_heads": 4,
    "mamba_head_dim": 8,
    "ssm_state_size": 8,
    "n_groups": 1,
    "index_n_heads": 2,
    "index_head_dim": 8,
    "index_topk": 4,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# What the generic shrinking cannot infer: sizes under other names, layer patterns, and switches that enable MoE.
CONFIG_FIXES: dict[str, dict] = {
    "dbrx": {
        "d_model": TINY_HIDDEN,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 64,
        # DBRX's attention reads rope_theta and clamps with clip_qkv, which its attention config no longer defaults.
        "attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": TINY_EXPERTS, "moe_top_k": TINY_TOP_K},
    },
    "doge": {"is_moe": True},
    "gemma4": {"enable_moe_block": True},
    "gemma4_assistant": {"enable_moe_block": True, "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0},
    "gemma4_text": {"enable_moe_block": True},
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_state": 8,
        "mamba_d_head": 16,
        "mamba_chunk_size": 16,
        "layer_types": ["mamba", "attention"],
    },
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_d_state": 4,
        "mamba_dt_rank": 4,
        "use_mamba_kernels": False,
    },
    # Kolibri 1.1 rounds keys and values to NVFP4 (head_dim a multiple of 16) and sizes its sparse indexer itself.
    "kolibri1_1": {
        "head_dim": 16,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "indexed_attention"],
        "mlp_only_layers": [0],
        "index_num_heads": 1,
        "index_topk": 4,
        "index_pool_size": 16,
        "index_compression": 2,
        "index_num_local_tokens": 4,
        "index_num_sink_tokens": 2,
    },
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "longcat_flash": {"num_layers": 1, "head_dim": 4, "zero_expert_num": 2},
    "mimo_v2_flash": {"num_key_value_heads": 2},
    "qwen4_exp": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    "zaya": {"num_experts_per_tok": 1},
    # Dots3's sliding-window layers take their own (large) attention sizes from swa_* keyword arguments.
    "dots3_note_text": {
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "swa_q_lora_rank": 8,
        "swa_kv_lora_rank": 8,
        "swa_head_dim": 8,
        "swa_qk_nope_head_dim": 4,
        "swa_v_head_dim": 8,
    },
}
CONFIG_FIXES["dots3_note"] = CONFIG_FIXES["dots3_note_text"]
CONFIG_FIXES["qwen4_exp_text"] = CONFIG_FIXES["qwen4_exp"]
SUB_CONFIG_FIXES: dict[str, dict[str, dict]] = {
    "dots3_note": {
        "vision_config": {"adapter_in_dim": TINY_HIDDEN, "adapter_out_dim": TINY_HIDDEN},
        "audio_config": {"adapter_input_size": TINY_HIDDEN, "adapter_out_dim": TINY_HIDDEN},
    },
}

UNCOVERED: dict[str, str] = {
    "gemma4_assistant": "its config rejects enable_moe_block=True: the Gemma 4 assistant is a dense draft model, "
    "MoE only through the Gemma4TextConfig it shares",
}
"""MoE-declaring architectures that no tiny MoE model can be built for, each with the reason (checked below)."""

PERFT_E_UNAVAILABLE: dict[str, str] = {
    "doge": "CDMoE has no per-token expert routing to reuse: its product-key router picks embedding rows (one "
    "scalar weight each) that the block computes inline, so there is no expert MLP an adapter could sit beside",
}
"""Architectures without per-token routing to MLP experts that PERFT-E could reuse: PERFT-E must refuse them with a
clear error. (Llama 4 and JetMoE, whose experts' call does not carry the routing, get it from their router.)"""

NOT_MOE: dict[str, str] = {
    "bamba": "its modeling code names experts, but fixes num_experts = 1 (a dense MLP)",
}
"""Causal-LM architectures whose modeling code mentions experts but that have no MoE configuration."""


def _sub_config_classes(config_class: type) -> dict[str, type]:
    """The sub-config classes of a composite config, resolving AutoConfig through its default model type."""
    resolved = {}
    defaults = getattr(config_class, "sub_configs_defaults", {}) or {}
    for key, sub_class in (getattr(config_class, "sub_configs", {}) or {}).items():
        if isinstance(sub_class, type) and dataclasses.is_dataclass(sub_class):
            resolved[key] = sub_class
        elif getattr(defaults.get(key), "model_type", None) in CONFIG_MAPPING:
            resolved[key] = CONFIG_MAPPING[defaults[key].model_type]
    return resolved


def _declares_experts(config_class: type) -> bool:
    """Whether the config (or a non-vision, non-audio sub-config) has an expert-count field."""
    if {field.name for field in dataclasses.fields(config_class)} & set(EXPERT_COUNT_FIELDS):
        return True
    subs = _sub_config_classes(config_class)
    return any(_declares_experts(sub) for key, sub in subs.items() if "vision" not in key and "audio" not in key)


@functools.cache
def moe_model_types() -> tuple[str, ...]:
    """Every causal-LM model type of the installed Transformers whose config declares an expert count."""
    return tuple(sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if _declares_experts(CONFIG_MAPPING[t])))


def _shrunk_settings(config_class: type, default: PretrainedConfig, fixes: dict) -> dict:
    """Keyword arguments that make ``config_class`` tiny: sizes, 4 experts top-2, enough layers for every layer kind.

    Per-layer lists that the config defaults explicitly are cut to the new depth; derived ones are left for the
    config to recompute, so that patterns like "first k dense" stay intact.
    """
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    settings = {name: value for name, value in TINY_SIZES.items() if name in fields}
    settings.update({name: TINY_EXPERTS for name in EXPERT_COUNT_FIELDS if name in fields})
    settings.update({name: TINY_TOP_K for name in TOP_K_FIELDS if name in fields})
    settings.update({name: 1 for name in SHARED_EXPERT_FIELDS if name in fields})
    values = default.to_dict()
    default_depth = values.get("num_hidden_layers")
    depth = _layers_covering_every_kind(values.get("layer_types"))
    settings["num_hidden_layers"] = depth
    for name, field in fields.items():
        value = values.get(name)
        if isinstance(value, list) and len(value) == default_depth and field.default is not None:
            settings[name] = value[:depth]
    return {**{name: value for name, value in settings.items() if name in fields}, **fixes}


def _layers_covering_every_kind(layer_types: list[str] | None) -> int:
    """Smallest depth (at least 2) whose leading layers include each kind of layer of the full model."""
    depth = 2
    while layer_types and len(set(layer_types[:depth])) < len(set(layer_types)):
        depth += 1
    return depth


@functools.cache
def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config of ``model_type``; composite configs get a tiny text part and one-layer other parts."""
    config_class = CONFIG_MAPPING[model_type]
    subs = _sub_config_classes(config_class)
    fixes = CONFIG_FIXES.get(model_type, {})
    if "text_config" not in subs:
        return config_class(**_shrunk_settings(config_class, config_class(), fixes))
    settings = {}
    for key, sub_class in subs.items():
        sub_default = sub_class()
        sub_settings = _shrunk_settings(sub_class, sub_default, fixes if key == "text_config" else {})
        if key != "text_config":
            sub_settings["num_hidden_layers"] = 1
            sub_settings.update({name: {} for name in ("per_layer_config",) if hasattr(sub_default, name)})
        sub_settings.update(SUB_CONFIG_FIXES.get(model_type, {}).get(key, {}))
        settings[key] = sub_settings
    return config_class(**settings)


@functools.cache
def _pristine_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def tiny_model(model_type: str) -> torch.nn.Module:
    """A fresh copy of the (cached) tiny model, so that tests never see each other's adapters."""
    return copy.deepcopy(_pristine_model(model_type))


def moe_layers(model: torch.nn.Module) -> set[str]:
    """Decoder layers holding routed experts, found by parameter names (an oracle independent of the detector)."""
    layers = set()
    for name, _ in model.named_parameters():
        match = re.match(r"^(.*?\.(?:layers|blocks|h)\.\d+)\.(.*)$", name)
        if match and re.search(r"expert|router", match.group(2)) and "shared_expert" not in match.group(2):
            layers.add(match.group(1))
    return layers


def _modeling_mentions_experts(model_type: str) -> bool:
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    source = inspect.getsource(inspect.getmodule(model_class))
    return re.search(r"self\.experts\b|Experts\b|num_experts", source) is not None


def _perft_config(variant: str) -> PerftConfig:
    """A PERFT config whose fresh adapter already changes the output (B random), so forward checks see it."""
    sizes = {"num_experts": 4, "top_k": 2} if variant == "R" else {"num_experts": 2} if variant == "D" else {}
    return PerftConfig(variant=variant, r=4, lora_alpha=8, init_weights=False, **sizes)


def _input_ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run the many tiny models on one thread: on a shared 2-core machine, intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COVERED = [t for t in moe_model_types() if t not in UNCOVERED]
VARIANT_CASES = [
    pytest.param(t, v, id=f"{t}-{v}") for t in COVERED for v in VARIANTS if not (v == "E" and t in PERFT_E_UNAVAILABLE)
]


def test_enumeration_agrees_with_modeling_code():
    """Every causal LM whose modeling code uses experts is enumerated as MoE (or listed as not MoE, with a reason)."""
    mentions = {t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if _modeling_mentions_experts(t)}
    declared = set(moe_model_types())
    assert mentions - declared == set(NOT_MOE), "MoE modeling code without an expert count in its config"
    assert not declared & set(NOT_MOE)
    assert len(declared) >= 50


def test_exception_lists_name_enumerated_architectures():
    """The skip and refusal lists hold only MoE architectures of this Transformers, so none goes stale."""
    assert set(UNCOVERED) <= set(moe_model_types())
    assert set(PERFT_E_UNAVAILABLE) <= set(COVERED)


@pytest.mark.parametrize("model_type", sorted(UNCOVERED))
def test_uncovered_architectures_cannot_be_built(model_type: str):
    """Each uncovered architecture really fails to become a tiny MoE model; the list is wrong if one builds."""
    with pytest.raises(Exception, match="enable_moe_block"):
        _pristine_model(model_type)


@pytest.mark.parametrize("model_type", COVERED)
def test_detector_finds_every_moe_layer(model_type: str):
    """One adapted block per MoE layer, none in dense layers, found by structure alone."""
    model = tiny_model(model_type)
    blocks = find_moe_blocks(model)
    expected_layers = moe_layers(model)
    assert expected_layers, f"the tiny {model_type} model has no MoE layer; fix its tiny config"
    owners = {next(layer for layer in expected_layers if name.startswith(f"{layer}.")) for name in blocks}
    assert len(blocks) == len(expected_layers) and owners == expected_layers
    for spec in blocks.values():
        assert spec.hidden_size == model.config.get_text_config().hidden_size
        assert spec.num_experts == TINY_EXPERTS


@pytest.mark.parametrize(("model_type", "variant"), VARIANT_CASES)
def test_variant(model_type: str, variant: str):
    """Forward and backward train only adapter tensors, the adapter acts, and save / load reproduces the logits."""
    input_ids = _input_ids()
    base_logits = _logits(_pristine_model(model_type), input_ids)
    peft_model = get_peft_model(tiny_model(model_type), _perft_config(variant))
    wrapped = [m for m in peft_model.modules() if isinstance(m, PerftMoeBlock)]
    assert len(wrapped) == len(moe_layers(peft_model))

    peft_model.train()
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in peft_model.named_parameters() if ".perft_" in n}
    assert trainable == adapter and adapter
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in adapter)
    assert all(peft_model.get_parameter(n).grad is not None for n in adapter)
    assert sum(peft_model.get_parameter(n).grad.abs().sum() for n in adapter) > 0

    peft_model.eval()
    adapted_logits = _logits(peft_model, input_ids)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-6)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, input_ids), base_logits, rtol=0, atol=0)
    assert_round_trip(peft_model, model_type, input_ids, adapted_logits)


def assert_round_trip(peft_model: PeftModel, model_type: str, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
    """Saving the adapter and loading it onto a fresh base model gives the same logits."""
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(tiny_model(model_type), directory)
    torch.testing.assert_close(_logits(reloaded, input_ids), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(PERFT_E_UNAVAILABLE))
def test_perft_e_refused(model_type: str):
    """Where the experts never receive the routing, PERFT-E fails with a message that says so and what to use."""
    with pytest.raises(ValueError, match=r"PERFT-E cannot adapt .*Use variant 'R', 'D' or 'S'"):
        get_peft_model(tiny_model(model_type), _perft_config("E"))


def _has_experts_implementations(model_type: str) -> bool:
    """Whether the model's experts dispatch through Transformers' experts interface (eager, grouped_mm, ...)."""
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return model_class._can_set_experts_implementation()


SWITCHABLE = [t for t in COVERED if _has_experts_implementations(t)]


@pytest.mark.parametrize("model_type", SWITCHABLE)
def test_experts_implementations_agree(model_type: str):
    """PERFT gives the same logits with every experts implementation of Transformers (where the model has them)."""
    model = tiny_model(model_type)
    variant = "R" if model_type in PERFT_E_UNAVAILABLE else "E"
    peft_model = get_peft_model(model, _perft_config(variant)).eval()
    input_ids = _input_ids()
    results = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        peft_model.get_base_model().set_experts_implementation(implementation)
        assert peft_model.get_base_model().config._experts_implementation == implementation
        results[implementation] = _logits(peft_model, input_ids)
    for implementation in EXPERTS_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(results[implementation], results["eager"], rtol=1e-5, atol=1e-5)


def _adapted_names(model: torch.nn.Module, **targeting) -> set[str]:
    peft_model = get_peft_model(model, PerftConfig(variant="S", r=4, **targeting))
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PerftMoeBlock)}


def test_layers_to_transform_counts_model_layers_dense_ones_included():
    """DeepSeek-V3's layer 0 is dense: layer index 1 is its first MoE block, and asking for layer 0 finds nothing."""
    assert _adapted_names(tiny_model("deepseek_v3")) == {"model.layers.1.mlp"}
    assert _adapted_names(tiny_model("deepseek_v3"), layers_to_transform=[1]) == {"model.layers.1.mlp"}
    with pytest.raises(ValueError):
        _adapted_names(tiny_model("deepseek_v3"), layers_to_transform=[0])


def test_target_modules_name_blocks_explicitly_and_exclude_modules_works():
    """Blocks can be named by path or regex, and excluded, on any attribute name (Granite's block_sparse_moe)."""
    all_blocks = {"model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"}
    assert _adapted_names(tiny_model("granitemoe")) == all_blocks
    chosen = _adapted_names(tiny_model("granitemoe"), target_modules=["model.layers.1.block_sparse_moe"])
    assert chosen == {"model.layers.1.block_sparse_moe"}
    by_regex = _adapted_names(tiny_model("granitemoe"), target_modules=r".*layers\.0\.block_sparse_moe")
    assert by_regex == {"model.layers.0.block_sparse_moe"}
    excluded = _adapted_names(tiny_model("granitemoe"), exclude_modules=["model.layers.0.block_sparse_moe"])
    assert excluded == {"model.layers.1.block_sparse_moe"}


def test_target_modules_that_name_no_moe_block_are_rejected():
    """Naming a dense module adapts nothing, so peft reports that no target was found."""
    with pytest.raises(ValueError):
        _adapted_names(tiny_model("granitemoe"), target_modules=["model.layers.0.self_attn"])


def test_multimodal_model_adapts_only_its_language_model():
    """Gemma 4 (image-text-to-text): the MoE layers sit in the language model, the towers stay untouched, and
    layers_to_transform counts the language model's layers."""
    model = tiny_model("gemma4")
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    layers = sorted(moe_layers(model))
    assert layers and all(layer.startswith("model.language_model.layers.") for layer in layers)
    assert _adapted_names(tiny_model("gemma4")) == {f"{layer}.experts" for layer in layers}
    assert _adapted_names(tiny_model("gemma4"), layers_to_transform=[1]) == {"model.language_model.layers.1.experts"}


def test_latent_moe_refuses_perft_e_and_keeps_block_variants():
    """NemotronH with moe_latent_size runs its experts in a narrower latent space: E says so, R still trains."""
    config = tiny_config("nemotron_h")
    latent = type(config)(**{**config.to_dict(), "moe_latent_size": 16})
    with pytest.raises(ValueError, match="width 16 behind a latent projection.*Use variant 'R', 'D' or 'S'"):
        get_peft_model(AutoModelForCausalLM.from_config(latent), _perft_config("E"))
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(latent), _perft_config("R"))
    input_ids = _input_ids()
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if ".perft_" in n)
