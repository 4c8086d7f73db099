"""The PEFT lifecycle with PERFT adapters: save, load, several adapters, disable, unload, generate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.monitor import RoutingMonitor


def perft(variant: str, **settings) -> PerftConfig:
    defaults = {"r": 4, "init_weights": False}
    if variant in "RD":
        defaults["num_experts"] = 3
    return PerftConfig(variant=variant, **{**defaults, **settings})


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_save_and_load_reproduce_logits_exactly(family: str, variant: str, tmp_path: Path, tokens) -> None:
    model = get_peft_model(build_tiny(family), perft(variant))
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny(family), tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference mode by default"


def test_saved_tensors_have_the_documented_stacked_layout(tmp_path: Path) -> None:
    get_peft_model(build_tiny(), perft("R", r=4, num_experts=3)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp."
    assert tensors[prefix + "perft_A"].shape == (3, 4, 32)
    assert tensors[prefix + "perft_B"].shape == (3, 32, 4)
    assert tensors[prefix + "perft_router"].shape == (3, 32)
    assert len(tensors) == 6, sorted(tensors)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "PERFT" and saved_config["variant"] == "R"


def test_low_cpu_mem_usage_and_is_trainable_loading(tmp_path: Path, tokens) -> None:
    model = get_peft_model(build_tiny(), perft("E"))
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    trainable = PeftModel.from_pretrained(build_tiny(), tmp_path, is_trainable=True)
    names = [name for name, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".perft_" in name for name in names)


def test_auto_peft_model_loads_base_and_adapter(tmp_path: Path, tokens) -> None:
    build_tiny().save_pretrained(tmp_path / "base")
    model = get_peft_model(build_tiny(), perft("D"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    expected = model(tokens).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)


def test_several_adapters_switch_and_delete(tokens) -> None:
    model = get_peft_model(build_tiny(), perft("R"), adapter_name="routed")
    model.add_adapter("experts", perft("E"))
    routed_only = get_peft_model(build_tiny(), perft("R"), adapter_name="routed")
    routed_only.load_state_dict(model.state_dict(), strict=False)
    experts_only = get_peft_model(build_tiny(), perft("E"), adapter_name="experts")
    experts_only.load_state_dict(model.state_dict(), strict=False)

    torch.testing.assert_close(model(tokens).logits, routed_only(tokens).logits, rtol=0, atol=0)
    model.set_adapter("experts")
    torch.testing.assert_close(model(tokens).logits, experts_only(tokens).logits, rtol=0, atol=0)
    model.base_model.set_adapter(["routed", "experts"])
    both = model(tokens).logits
    assert not torch.allclose(both, routed_only(tokens).logits)
    model.delete_adapter("experts")
    assert model.active_adapters == ["routed"]
    torch.testing.assert_close(model(tokens).logits, routed_only(tokens).logits, rtol=0, atol=0)
    assert all("experts" not in block.perft_A for block in model.modules() if isinstance(block, PerftMoeBlock))


def test_a_deleted_adapter_leaves_no_trace_for_the_routing_monitor(tokens) -> None:
    """After ``delete_adapter`` the monitor, which plans its counters from the blocks' adapter configs, counts the
    remaining PERFT-R router only (it used to plan one for the deleted adapter too, and fail on its router weight)."""
    model = get_peft_model(build_tiny(), perft("R"), adapter_name="kept")
    model.add_adapter("deleted", perft("R"))
    model.delete_adapter("deleted")
    with RoutingMonitor(model) as monitor:
        model(tokens)
    report = monitor.report()
    assert {stats.adapter for stats in report.routers if stats.router == "perft"} == {"kept"}
    assert all(stats.tokens == tokens.numel() for stats in report.routers)


@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_disable_adapter_and_unload_give_the_base_model_back(variant: str, tokens) -> None:
    expected = build_tiny()(tokens).logits
    model = get_peft_model(build_tiny(), perft(variant))
    assert not torch.allclose(model(tokens).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    original = model.unload()
    assert not any(isinstance(module, PerftMoeBlock) for module in original.modules())
    assert not any(module._forward_hooks for module in original.modules()), "unload must leave no PERFT hook"
    assert type(original.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock"
    torch.testing.assert_close(original(tokens).logits, expected, rtol=0, atol=0)
    assert not hasattr(original(tokens, labels=tokens, output_router_logits=True), "perft_aux_loss")


def test_merge_is_refused_with_an_explanation() -> None:
    model = get_peft_model(build_tiny(), perft("R"))
    with pytest.raises(NotImplementedError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()


@pytest.mark.parametrize("variant", ["R", "E"])
def test_generate_with_kv_cache_matches_generation_without_cache(variant: str) -> None:
    model = get_peft_model(build_tiny(), perft(variant))
    prompt = torch.tensor([[5, 9, 13, 17]])
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=prompt, use_cache=True, **settings)
    uncached = model.generate(input_ids=prompt, use_cache=False, **settings)
    assert cached.shape == (1, 10)
    assert torch.equal(cached, uncached)


def test_dense_model_gets_an_error_naming_its_type() -> None:
    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="no Mixture-of-Experts block in this 'llama' model"):
        get_peft_model(dense, PerftConfig())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variant": "Q"}, "variant"),
        ({"r": 0}, "r=0"),
        ({"r": 2.5}, "r=2.5"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"adapter_type": "prefix"}, "adapter_type"),
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 5, "num_experts": 4}, "top_k=5 is larger than num_experts=4"),
        ({"variant": "S", "num_experts": 2}, "num_experts"),
        ({"variant": "E", "num_experts": 4}, "num_experts"),
        ({"variant": "D", "top_k": 1}, "top_k"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
    ],
)
def test_invalid_configuration_fails_at_construction(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerftConfig(**settings)


def test_layers_to_transform_and_explicit_targets() -> None:
    model = get_peft_model(build_tiny(), perft("S", layers_to_transform=[1]))
    assert isinstance(model.base_model.model.model.layers[1].mlp, PerftMoeBlock)
    assert not isinstance(model.base_model.model.model.layers[0].mlp, PerftMoeBlock)
    named = get_peft_model(build_tiny(), perft("S", target_modules=["model.layers.0.mlp"]))
    assert isinstance(named.base_model.model.model.layers[0].mlp, PerftMoeBlock)
    assert not isinstance(named.base_model.model.model.layers[1].mlp, PerftMoeBlock)
    excluded = get_peft_model(build_tiny(), perft("S", exclude_modules=["model.layers.0.mlp"]))
    assert not isinstance(excluded.base_model.model.model.layers[0].mlp, PerftMoeBlock)
    assert isinstance(excluded.base_model.model.model.layers[1].mlp, PerftMoeBlock)
