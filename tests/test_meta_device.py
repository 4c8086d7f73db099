"""Models prepared on the meta device: the flagship shapes at their real sizes get their adapter on meta and run
forward and backward there, with the trainable counts of docs/variants.md; a model materialised from meta and
initialised with ``init_perft_weights`` holds the adapter `get_peft_model` gives on a real device."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from conftest import build_tiny, tiny_olmoe_config
from peft import LoraConfig, get_peft_model
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, OlmoeForCausalLM

from peft_perft import PerftConfig, PerftMoeBlock

FLAGSHIPS = ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "glm4_moe", "llama4_text"]
LAYERS = 4
VARIANTS = ["R", "E", "D", "S"]
PERFT_DEFAULTS = {"r": 8, "R": 8, "D": 2, "S": 1}  # docs/variants.md: rank, and adapter experts per variant


def published_shape(model_type: str):
    """Transformers' default config for the model type (the published model's sizes), with only 4 layers."""
    return CONFIG_MAPPING[model_type](num_hidden_layers=LAYERS)


def moe_layer_count(config) -> int:
    """How many of the layers are MoE layers, read from the config's own layer-layout fields."""
    layers = range(config.num_hidden_layers)
    if hasattr(config, "first_k_dense_replace"):  # DeepSeek-V3, GLM-4-MoE: dense first layers
        return sum(index >= config.first_k_dense_replace for index in layers)
    if hasattr(config, "decoder_sparse_step"):  # Qwen2-MoE, Qwen3-MoE
        sparse = [i for i in layers if (i + 1) % config.decoder_sparse_step == 0]
        return sum(i not in config.mlp_only_layers for i in sparse)
    if hasattr(config, "moe_layers"):  # Llama 4
        return sum(index in config.moe_layers for index in layers)
    return config.num_hidden_layers


def routed_expert_count(config) -> int:
    for field in ("n_routed_experts", "num_local_experts", "num_experts"):
        if getattr(config, field, None):
            return getattr(config, field)
    raise AssertionError(f"no expert count in {type(config).__name__}")


def formula_parameters(variant: str, config) -> int:
    """docs/variants.md's trainable parameters per MoE block, times the MoE blocks."""
    hidden, rank = config.hidden_size, PERFT_DEFAULTS["r"]
    experts = routed_expert_count(config) if variant == "E" else PERFT_DEFAULTS[variant]
    per_block = 2 * experts * hidden * rank + (experts * hidden if variant == "R" else 0)
    return per_block * moe_layer_count(config)


@pytest.fixture(scope="module", params=FLAGSHIPS)
def meta_flagship(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    """One flagship at its published sizes, 4 layers, bf16, built on meta (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(published_shape(request.param), dtype=torch.bfloat16)
    return request.param, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_flagship_on_meta_runs_forward_and_backward_with_the_documented_counts(meta_flagship, variant: str) -> None:
    model_type, base = meta_flagship
    model = get_peft_model(base, PerftConfig(variant=variant))
    try:
        adapter = {name: p for name, p in model.named_parameters() if ".perft_" in name}
        assert adapter and all(p.is_meta and p.dtype == torch.float32 for p in adapter.values())
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert trainable.keys() == adapter.keys()
        assert sum(p.numel() for p in trainable.values()) == formula_parameters(variant, published_shape(model_type))
        input_ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
        output = model(input_ids=input_ids, labels=input_ids)
        assert output.logits.is_meta and output.logits.shape[:2] == (2, 5)
        output.loss.backward()
        for name, parameter in trainable.items():
            assert parameter.grad is not None and parameter.grad.is_meta, name
            assert parameter.grad.shape == parameter.shape, name
    finally:
        model.unload()


@pytest.mark.parametrize("on_meta", [False, True], ids=["real", "meta"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_adapter_device_and_dtype_follow_peft_lora(on_meta: bool, autocast_adapter_dtype: bool) -> None:
    """PERFT's tensors land where LoRA's land on the same bf16 base: its device (meta too), and fp32 or bf16 as
    peft's ``autocast_adapter_dtype`` says."""
    placements = {}
    for tuner in (LoraConfig(target_modules=["q_proj"], r=4), PerftConfig(variant="R", r=4)):
        with torch.device("meta" if on_meta else "cpu"):
            base = OlmoeForCausalLM(tiny_olmoe_config()).to(torch.bfloat16)
        model = get_peft_model(base, tuner, autocast_adapter_dtype=autocast_adapter_dtype)
        adapter = [p for name, p in model.named_parameters() if p.requires_grad]
        placements[type(tuner).__name__] = {(p.device.type, p.dtype) for p in adapter}
    assert placements["PerftConfig"] == placements["LoraConfig"]
    assert len(placements["PerftConfig"]) == 1


def materialise_from_meta(config: PerftConfig, base_state: dict[str, torch.Tensor], **peft_kwargs) -> torch.nn.Module:
    """The tiny OLMoE built on meta in the base state's dtype, adapted there, then materialised on the CPU with the
    base weights loaded (non-persistent buffers such as the rotary frequencies recomputed by Transformers)."""
    with torch.device("meta"):
        base = OlmoeForCausalLM(tiny_olmoe_config()).to(next(iter(base_state.values())).dtype)
    model = get_peft_model(base, config, **peft_kwargs)
    wrapped_keys = [key for key in model.get_base_model().state_dict() if ".perft_" not in key]
    names = {key.replace(".base_layer.", "."): key for key in wrapped_keys}
    model.to_empty(device="cpu")
    model.get_base_model().initialize_weights()
    wrapped = {names[key]: tensor for key, tensor in base_state.items()}
    missing, unexpected = model.get_base_model().load_state_dict(wrapped, strict=False)
    assert not unexpected and all(".perft_" in key for key in missing)
    return model


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_init_after_materialising_equals_the_real_device_adapter(
    variant: str, dtype: torch.dtype, autocast_adapter_dtype: bool, tokens
) -> None:
    """Same seed before get_peft_model (real base) and before init_perft_weights (materialised from meta): the same
    adapter to the bit, B drawn at random to compare it too, and the same logits."""
    config = PerftConfig(variant=variant, r=4, num_experts={"R": 3, "D": 2}.get(variant), init_weights=False)
    real_base = build_tiny().to(dtype)
    base_state = {key: tensor.clone() for key, tensor in real_base.state_dict().items()}
    torch.manual_seed(7)
    real = get_peft_model(real_base, config, autocast_adapter_dtype=autocast_adapter_dtype)
    deferred = materialise_from_meta(config, base_state, autocast_adapter_dtype=autocast_adapter_dtype)
    torch.manual_seed(7)
    deferred.init_perft_weights()
    expected = {name: p for name, p in real.named_parameters() if ".perft_" in name}
    found = {name: p for name, p in deferred.named_parameters() if ".perft_" in name}
    assert found.keys() == expected.keys()
    for name, parameter in expected.items():
        assert found[name].dtype == parameter.dtype and torch.equal(found[name], parameter), name
    with torch.no_grad():
        torch.testing.assert_close(deferred(input_ids=tokens).logits, real(input_ids=tokens).logits, rtol=0, atol=0)


def test_default_init_after_materialising_leaves_the_base_output() -> None:
    """With the default init (B = 0) the materialised, initialised model gives the base model's logits."""
    base = build_tiny()
    base_state = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    model = materialise_from_meta(PerftConfig(variant="R", r=4), base_state)
    model.init_perft_weights()
    assert all(torch.count_nonzero(p) == 0 for name, p in model.named_parameters() if ".perft_B." in name)
    assert all(torch.count_nonzero(p) > 0 for name, p in model.named_parameters() if ".perft_A." in name)
    input_ids = torch.arange(3, 17).view(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_accelerate_init_empty_weights_then_assigned_base_weights_gets_the_real_device_adapter(variant: str, tokens):
    """Accelerate's flow: built under ``init_empty_weights`` (buffers real), adapted there, base weights loaded with
    ``assign=True``; init_perft_weights gives the still-meta adapter memory and the real-device values."""
    config = PerftConfig(variant=variant, r=4, init_weights=False)
    real_base = build_tiny()
    base_state = {key: tensor.clone() for key, tensor in real_base.state_dict().items()}
    torch.manual_seed(3)
    real = get_peft_model(real_base, config)
    with init_empty_weights():
        base = OlmoeForCausalLM(tiny_olmoe_config())
    model = get_peft_model(base, config)
    assert all(p.is_meta for name, p in model.named_parameters() if ".perft_" in name)
    names = {key.replace(".base_layer.", "."): key for key in model.get_base_model().state_dict()}
    wrapped = {names[key]: tensor for key, tensor in base_state.items()}
    model.get_base_model().load_state_dict(wrapped, strict=False, assign=True)
    torch.manual_seed(3)
    model.init_perft_weights()
    expected = {name: p for name, p in real.named_parameters() if p.requires_grad}
    found = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[name], parameter) for name, parameter in expected.items())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, real(input_ids=tokens).logits, rtol=0, atol=0)
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in found.values())


def test_init_on_a_model_still_on_meta_says_to_materialise_first() -> None:
    with torch.device("meta"):
        base = OlmoeForCausalLM(tiny_olmoe_config())
    model = get_peft_model(base, PerftConfig(variant="S", r=4))
    with pytest.raises(RuntimeError, match=r"to_empty\(device=\.\.\.\)"):
        model.init_perft_weights()


def test_torch_generic_reset_loop_initialises_every_adapter_of_a_materialised_model() -> None:
    """torch's meta-device recipe, ``reset_parameters()`` on every module that has it after ``to_empty``, gives
    every adapter of every block LoRA's init: A within the Kaiming-uniform bound, B = 0, the router drawn."""
    base = build_tiny()
    model = materialise_from_meta(PerftConfig(variant="R", r=4), dict(base.state_dict()))
    model.add_adapter("second", PerftConfig(variant="S", r=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".perft_" in name:
                parameter.fill_(float("nan"))
    reset = [module for module in model.modules() if callable(getattr(module, "reset_parameters", None))]
    assert sum(isinstance(module, PerftMoeBlock) for module in reset) == 2
    for module in reset:
        module.reset_parameters()
    adapter = {name: p for name, p in model.named_parameters() if ".perft_" in name}
    assert {name.rsplit(".", 1)[1] for name in adapter} == {"default", "second"}
    bound = 1 / tiny_olmoe_config().hidden_size ** 0.5
    for name, parameter in adapter.items():
        assert not parameter.isnan().any(), name
        if ".perft_A." in name:
            assert 0 < parameter.abs().max() <= bound, name
        elif ".perft_B." in name:
            assert torch.count_nonzero(parameter) == 0, name
        else:
            assert 0 < parameter.std() < 0.05, name
