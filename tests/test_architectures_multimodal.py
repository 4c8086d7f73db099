"""Coverage of PERFT over the MoE models of Transformers that are not plain causal LMs.

``tests/test_architectures.py`` walks the causal-LM auto class. Here every other auto class is searched (image-text
to text, seq2seq, multimodal LM, token classification, pose estimation, backbones and base models), and a model type
counts as MoE when its config class (or a sub-config) declares an expert count, independently of PERFT's detector.
Each case is built tiny from its config (language tower shrunk as in the causal-LM walk, vision and audio towers
shrunk to one narrow layer), adapted by every variant, run forward (text tokens into the language tower; encoder
and decoder tokens for seq2seq) and backward, and must save and reload exactly. Where a variant cannot apply, its
refusal by ``get_peft_model`` is tested. ``scripts/support_matrix.py`` renders this file beside the causal-LM one.
"""

from __future__ import annotations

import copy
import functools
import re
import tempfile

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from test_architectures import CONFIG_FIXES as CAUSAL_CONFIG_FIXES
from test_architectures import (
    EXPERT_COUNT_FIELDS,
    EXPERTS_IMPLEMENTATIONS,
    SUB_CONFIG_FIXES,
    TINY_EXPERTS,
    TINY_HIDDEN,
    VARIANTS,
    _declares_experts,
    _perft_config,
    _shrunk_settings,
    _sub_config_classes,
)
from test_special_routing import (
    adapted_blocks,
    assert_perft_e_follows_the_reference_routing,
    hidden_states,
    perft,
    randomise_router,
)
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from peft_perft import PerftMoeBlock
from peft_perft.architectures import find_moe_blocks
from peft_perft.monitor import RoutingMonitor, modality_load, routing_trace

MODEL_CLASSES: dict[str, dict[str, str]] = {
    "image-text-to-text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "multimodal LM": modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    "token classification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "pose estimation": modeling_auto.MODEL_FOR_POSE_ESTIMATION_MAPPING_NAMES,
    "backbone": modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES,
    "base model": modeling_auto.MODEL_MAPPING_NAMES,
}
"""The auto classes searched, in order: a model type is tested under the first one that has it."""
CAUSAL_LM_COMPANIONS = ("image-text-to-text", "seq2seq", "multimodal LM")

TOWER_SIZES = {
    "hidden_size": TINY_HIDDEN,
    "intermediate_size": 32,
    "num_heads": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "depth": 1,
    "num_hidden_layers": 1,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "d_model": TINY_HIDDEN,
    "out_hidden_size": TINY_HIDDEN,
    "output_dim": TINY_HIDDEN,
    "text_hidden_size": TINY_HIDDEN,
    "projector_input_dim": TINY_HIDDEN,
    "projector_output_dim": TINY_HIDDEN,
    "vision_output_dim": TINY_HIDDEN,
    "downsample_hidden_size": 16,
    "mlp_dim": 32,
    "output_channels": 32,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}
"""Vision and audio towers: one narrow layer (widths that feed the language model match its hidden size)."""

CONFIG_FIXES: dict[str, dict] = {
    # ERNIE-4.5-VL's experts come in two groups, text and vision, each with its own expert width.
    "ernie4_5_vl_moe": {"moe_intermediate_size": [16, 8], "head_dim": 128},
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse"]},
    "step3p7": {"mlp_layer_types": ["dense", "sparse"], "sliding_window": 4},
    "nllb-moe": {
        "vocab_size": 64,
        "d_model": TINY_HIDDEN,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "expert_capacity": 16,
        "max_position_embeddings": 64,
        "decoder_start_token_id": 2,
    },
    "switch_transformers": {
        "vocab_size": 64,
        "d_model": TINY_HIDDEN,
        "d_kv": 8,
        "d_ff": 32,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_sparse_encoder_layers": 1,
        "num_sparse_decoder_layers": 1,
        "expert_capacity": 16,
        "decoder_start_token_id": 0,
    },
    "glm4v_moe": {"head_dim": 128},
    "glm4v_moe_text": {"head_dim": 128},
    "glm5_next": {"index_topk": 16, "qk_rope_head_dim": 0},
    "glm5_next_text": {"index_topk": 16, "qk_rope_head_dim": 0},
    "hy_v4_vl": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "mrope_section": [1, 1, 0]}},
    "hy_v4_vl_text": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "mrope_section": [1, 1, 0]}},
    "vitpose": {"num_experts": TINY_EXPERTS},
    "vitpose_backbone": {
        "num_experts": TINY_EXPERTS,
        "hidden_size": TINY_HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "part_features": 8,
        "out_indices": [1],
    },
}
"""What the generic shrinking cannot infer, per model type (merged over the causal-LM walk's fixes)."""

TOWER_FIXES: dict[str, dict[str, dict]] = {
    # dots.3's vision encoder has MoE layers of its own ("sparse"), sized per layer: one such layer, 4 experts.
    "dots3_note": {
        "vision_config": {
            "mlp_layer_types": ["sparse"],
            "num_local_experts": TINY_EXPERTS,
            "moe_intermediate_size": 16,
            "per_layer_config": {0: {"num_local_experts": TINY_EXPERTS, "num_experts_per_tok": 2}},
        }
    },
    "muse_spark": {
        "vision_config": {"num_hidden_layers": 4, "depths": [1, 1, 1, 1], "hidden_sizes": [8, 8, 16, 32]},
        "audio_config": {"num_hidden_layers": 4, "depths": [1, 1, 1, 1], "hidden_sizes": [8, 8, 16, 32]},
    },
    "nemo_speechlm": {
        "word_timestamp_config": {"blank_token_id": 63},
        "audio_config": {"diarization_config": {"head_config": {"audio_hidden_size": TINY_HIDDEN}}},
    },
    "nemotron_h_omni": {
        "vision_config": {"video_temporal_patch_size": 2},
        "": {"vision_hidden_size": TINY_HIDDEN, "projector_hidden_size": TINY_HIDDEN},
    },
    # Inkling's vision encoder plans its layer widths from the patch size (at 40 pixels, one projection is 23 GB).
    "inkling_mm_model": {"vision_config": {"n_layers": 2, "patch_size": 2, "temporal_patch_size": 2}},
    # The omni model's talker (an MoE codec decoder) reads the thinker's hidden states; checkpoints carry the two
    # sizes its config does not default (shared expert width, merge size).
    "qwen3_omni_moe": {
        "talker_config": {
            "": {
                "thinker_hidden_size": TINY_HIDDEN,
                "accept_hidden_layer": 1,
                "num_code_groups": 2,
                "spatial_merge_size": 2,
            },
            "text_config": {"shared_expert_intermediate_size": 16},
            "code_predictor_config": {"num_code_groups": 2},
        },
        "code2wav_config": {
            "codebook_size": 64,
            "decoder_dim": TINY_HIDDEN,
            "num_quantizers": 2,
            "upsample_rates": [2, 2],
            "upsampling_ratios": [2],
        },
    },
}
"""Per tower (sub-config) settings beyond TOWER_SIZES; key "" holds settings of the composite config itself."""

PENDING: dict[str, str] = {}

"""MoE model types whose tiny model is not built here yet, each with what stops it (rendered in the matrix)."""

NOT_ROUTED: dict[str, str] = {
    "vitpose": "ViTPose+ picks one expert per image from its dataset index (no router, no per-token routing), so "
    "there is no routed MoE block to adapt",
    "vitpose_backbone": "ViTPose+ picks one expert per image from its dataset index (no router, no per-token "
    "routing), so there is no routed MoE block to adapt",
}
"""Model types that declare experts but have no routed MoE block: every variant must be refused."""

PERFT_E_UNAVAILABLE: dict[str, str] = {
    "muse_spark": "its experts work at a width of their own behind a latent projection, not at the block's hidden size",
    "muse_spark_text": "its experts work at a width of their own behind a latent projection, not at the block's "
    "hidden size",
}
"""Model types whose MoE blocks do not pass the routing to their experts: PERFT-E must be refused by name."""


def _class_name(mapping: dict[str, str], model_type: str) -> str:
    name = mapping[model_type]
    return name if isinstance(name, str) else name[0]


def _model_class(model_type: str) -> tuple[str, str] | None:
    """(auto class label, model class name) that this file tests ``model_type`` under, or None when the causal-LM
    walk already builds that class. A causal-LM type is tested again only under a multimodal or seq2seq class: its
    base model and classification heads hold the very blocks the causal-LM walk adapts."""
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    for label, mapping in MODEL_CLASSES.items():
        if model_type in causal and label not in CAUSAL_LM_COMPANIONS:
            continue
        if model_type in mapping:
            name = _class_name(mapping, model_type)
            if model_type in causal and _class_name(causal, model_type) == name:
                return None
            return label, name
    return None


def _is_moe(model_type: str) -> bool:
    config_class = CONFIG_MAPPING[model_type]
    if _declares_experts(config_class):
        return True
    fields = set(getattr(config_class, "__dataclass_fields__", {}))
    return bool(fields & set(EXPERT_COUNT_FIELDS))


@functools.cache
def moe_cases() -> dict[str, tuple[str, str]]:
    """Every MoE model type of the installed Transformers outside the causal-LM walk: model type -> (label, class)."""
    types = {t for mapping in MODEL_CLASSES.values() for t in mapping if t in CONFIG_MAPPING and _is_moe(t)}
    return {t: found for t in sorted(types) if (found := _model_class(t)) is not None}


def _tower_settings(config_class: type, default: PretrainedConfig, fixes: dict) -> dict:
    """TOWER_SIZES where the tower has them, applied to the towers nested in it too (an OCR model's SAM encoder)."""
    values = default.to_dict()
    settings = {name: value for name, value in TOWER_SIZES.items() if name in values}
    settings.update({name: {} for name in ("per_layer_config",) if name in values})
    towers = _sub_config_classes(config_class)
    for key, sub_class in towers.items():
        if getattr(default, key, None) is not None:
            settings[key] = _tower_settings(sub_class, sub_class(), fixes.get(key, {}))
    return {**settings, **{name: value for name, value in fixes.items() if name not in towers}}


@functools.cache
def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config: the language part as in the causal-LM walk, other towers one narrow layer."""
    config_class = CONFIG_MAPPING[model_type]
    fixes = {**CAUSAL_CONFIG_FIXES.get(model_type, {}), **CONFIG_FIXES.get(model_type, {})}
    if not _is_composite(config_class):
        return config_class(**_shrunk_settings(config_class, config_class(), fixes))
    tower_fixes = TOWER_FIXES.get(model_type, {})
    overrides = SUB_CONFIG_FIXES.get(model_type, {})
    return config_class(**_composite_settings(config_class, fixes, tower_fixes, overrides))


def _is_composite(config_class: type) -> bool:
    """Whether the config holds a language tower, directly or one level down (an omni model's thinker and talker)."""
    subs = _sub_config_classes(config_class)
    return "text_config" in subs or any("text_config" in _sub_config_classes(sub) for sub in subs.values())


def _composite_settings(config_class: type, fixes: dict, tower_fixes: dict, overrides: dict) -> dict:
    """Settings of a composite config: each language tower shrunk as in the causal-LM walk (with ``fixes``), each
    nested composite (an omni model's thinker or talker) shrunk the same way, every other tower one narrow layer.
    ``tower_fixes`` holds per-key settings (key "" for the composite itself), ``overrides`` the causal walk's."""
    settings = dict(tower_fixes.get("", {}))
    default = config_class()
    for key, sub_class in _sub_config_classes(config_class).items():
        if getattr(default, key, None) is None:
            continue  # an optional tower (an omni model's audio encoder) that the default model leaves out
        if key == "text_config":
            sub_settings = {**_shrunk_settings(sub_class, sub_class(), fixes), **tower_fixes.get(key, {})}
        elif _is_composite(sub_class):
            sub_settings = _composite_settings(sub_class, fixes, tower_fixes.get(key, {}), {})
        else:
            sub_settings = _tower_settings(sub_class, sub_class(), tower_fixes.get(key, {}))
        sub_settings.update(overrides.get(key, {}))
        settings[key] = sub_settings
    return settings


LEFT_UNINITIALIZED: dict[str, str] = {
    # Transformers 5.25 builds the omni talker's experts with torch.empty and its init skips them: from a config
    # (not a checkpoint) they hold whatever memory was there, NaN in some runs.
    "qwen3_omni_moe": r"^talker\.model\.layers\.\d+\.mlp\.experts\.",
}
"""Parameters (by name pattern) that a model's from-config init leaves uninitialized: the walk initializes them."""


@functools.cache
def _pristine_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    _, class_name = moe_cases()[model_type]
    model = getattr(transformers, class_name)(tiny_config(model_type)).eval()
    pattern = LEFT_UNINITIALIZED.get(model_type)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern is not None and re.match(pattern, name):
                parameter.normal_(0.0, 0.02)
    return model


def tiny_model(model_type: str) -> torch.nn.Module:
    """A fresh copy of the (cached) tiny model, so that tests never see each other's adapters."""
    return copy.deepcopy(_pristine_model(model_type))


def moe_layers(model: torch.nn.Module) -> set[str]:
    """Layers holding routed experts, found by parameter names (an oracle independent of the detector); unlike the
    causal-LM walk's, it also sees a base model's top-level ``layers``, T5-style ``block`` and towers that share
    their weights (DiffusionGemma's encoder and decoder)."""
    layers = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        match = re.match(r"^((?:.*?\.)?(?:layers|blocks|block|h)\.\d+)\.(.*)$", name)
        if match and re.search(r"expert|router", match.group(2)) and "shared_expert" not in match.group(2):
            layers.add(match.group(1))
    return layers


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Text tokens for the language tower; encoder-decoder models get decoder tokens too."""
    input_ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": input_ids, "decoder_input_ids": input_ids.flip(-1)}
    return {"input_ids": input_ids}


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor: logits where it has a head, else the last hidden state."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if type(base).forward is torch.nn.Module.forward:
        return _thinker_and_talker_output(base, inputs)
    output = model(**inputs)
    for name in ("logits", "last_hidden_state", "heatmaps"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output.feature_maps[-1]


def _thinker_and_talker_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """An omni model has no forward of its own (it generates text, then speech): the thinker's logits beside the
    talker's codec logits, the talker reading the thinker's token embeddings through its text projection as in
    generation, so that both MoE decoders are run."""
    input_ids = inputs["input_ids"]
    thinker_logits = model.thinker(input_ids=input_ids).logits
    talker_inputs = model.talker.text_projection(model.thinker.get_input_embeddings()(input_ids))
    talker_logits = model.talker(
        inputs_embeds=talker_inputs, talker_input_ids=input_ids, attention_mask=torch.ones_like(input_ids)
    ).logits
    return torch.cat([thinker_logits, talker_logits], dim=-1)


def _no_grad_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output without gradients, from a fixed seed: a block-diffusion model (DiffusionGemma) draws its noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        return _output(model, inputs)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run the many tiny models on one thread: on a shared machine, intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COVERED = [t for t in moe_cases() if t not in PENDING and t not in NOT_ROUTED]
VARIANT_CASES = [
    pytest.param(t, v, id=f"{t}-{v}") for t in COVERED for v in VARIANTS if not (v == "E" and t in PERFT_E_UNAVAILABLE)
]


def test_every_moe_model_type_is_walked_by_one_of_the_two_files():
    """The enumeration is not empty, names the multimodal and seq2seq MoE models, and the exception lists name
    only enumerated types, so none goes stale."""
    cases = moe_cases()
    for expected in ("qwen3_vl_moe", "ernie4_5_vl_moe", "aria", "switch_transformers", "nllb-moe", "llama4"):
        assert expected in cases
    assert cases["switch_transformers"][0] == "seq2seq" and cases["qwen3_vl_moe"][0] == "image-text-to-text"
    assert {"inkling_mm_model", "qwen3_omni_moe"} <= set(COVERED), "the omni models with the deepest nesting"
    assert (set(PENDING) | set(NOT_ROUTED)) <= set(cases) and set(PERFT_E_UNAVAILABLE) <= set(COVERED)
    assert not set(PENDING) & set(NOT_ROUTED)


@pytest.mark.parametrize("model_type", COVERED)
def test_detector_finds_every_moe_layer(model_type: str):
    """One adapted block per MoE layer, in every tower that has one, found by structure alone."""
    model = tiny_model(model_type)
    blocks = find_moe_blocks(model)
    expected_layers = moe_layers(model)
    assert expected_layers, f"the tiny {model_type} model has no MoE layer; fix its tiny config"
    owners = {next(layer for layer in expected_layers if name.startswith(f"{layer}.")) for name in blocks}
    assert owners == expected_layers
    assert all(spec.num_experts == TINY_EXPERTS for spec in blocks.values())


@pytest.mark.parametrize(("model_type", "variant"), VARIANT_CASES)
def test_variant(model_type: str, variant: str):
    """Forward and backward train only adapter tensors, the adapter acts, and save / load reproduces the output."""
    inputs = _inputs(_pristine_model(model_type))
    base_output = _no_grad_output(_pristine_model(model_type), inputs)
    peft_model = get_peft_model(tiny_model(model_type), _perft_config(variant))
    wrapped = [m for m in peft_model.modules() if isinstance(m, PerftMoeBlock)]
    assert len(wrapped) == len(find_moe_blocks(_pristine_model(model_type)))

    peft_model.train()
    _output(peft_model, inputs).float().pow(2).mean().backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in peft_model.named_parameters() if ".perft_" in n}
    assert trainable == adapter and adapter
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in adapter)
    assert (
        sum(
            peft_model.get_parameter(n).grad.abs().sum()
            for n in adapter
            if peft_model.get_parameter(n).grad is not None
        )
        > 0
    )

    peft_model.eval()
    adapted = _no_grad_output(peft_model, inputs)
    assert not torch.allclose(adapted, base_output, atol=1e-6)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_no_grad_output(peft_model, inputs), base_output, rtol=0, atol=0)
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(tiny_model(model_type), directory).eval()
    torch.testing.assert_close(_no_grad_output(reloaded, inputs), adapted, rtol=1e-5, atol=1e-5)


def _has_experts_implementations(model_type: str) -> bool:
    """Whether the model's experts dispatch through Transformers' experts interface (eager, grouped_mm, ...)."""
    return getattr(transformers, moe_cases()[model_type][1])._can_set_experts_implementation()


SWITCHABLE = [t for t in COVERED if _has_experts_implementations(t)]


@pytest.mark.parametrize("model_type", SWITCHABLE)
def test_experts_implementations_agree(model_type: str):
    """PERFT gives the same output with every experts implementation of Transformers (where the model has them)."""
    variant = "R" if model_type in PERFT_E_UNAVAILABLE else "E"
    peft_model = get_peft_model(tiny_model(model_type), _perft_config(variant)).eval()
    inputs = _inputs(peft_model)
    results = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        peft_model.get_base_model().set_experts_implementation(implementation)
        assert peft_model.get_base_model().config._experts_implementation == implementation
        results[implementation] = _no_grad_output(peft_model, inputs)
    for implementation in EXPERTS_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(results[implementation], results["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(PERFT_E_UNAVAILABLE))
def test_perft_e_refused(model_type: str):
    """Where the experts never receive the routing, PERFT-E fails with a message that says so and what to use."""
    with pytest.raises(ValueError, match=r"PERFT-E cannot adapt .*Use variant 'R', 'D' or 'S'"):
        get_peft_model(tiny_model(model_type), _perft_config("E"))


@pytest.mark.parametrize("model_type", sorted(NOT_ROUTED))
def test_not_routed_models_are_refused(model_type: str):
    """A model with experts but no router has no MoE block: get_peft_model says that no target was found."""
    model = tiny_model(model_type)
    assert not find_moe_blocks(model)
    with pytest.raises(ValueError, match="MoE|target"):
        get_peft_model(model, _perft_config("R"))


def switch_reference(flat: torch.Tensor, mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, weights, block output) of Switch Transformers' top-1 routing written out: softmax, argmax, each
    expert taking at most ``expert_capacity`` tokens of a sequence in token order (later ones skip the experts and
    get weight 0), output = p * E(h)."""
    probabilities = torch.softmax(flat @ mlp.router.classifier.weight.t(), dim=-1)
    top, index = probabilities.max(dim=-1)
    sequence_length = flat.shape[0] // SWITCH_BATCH
    taken: dict[tuple[int, int], int] = {}
    weight, output = torch.zeros_like(top), torch.zeros_like(flat)
    for token, expert in enumerate(index.tolist()):
        key = (token // sequence_length, expert)
        taken[key] = taken.get(key, 0) + 1
        if taken[key] <= mlp.router.expert_capacity:
            weight[token] = top[token]
            output[token] = top[token] * mlp.experts[f"expert_{expert}"](flat[token])
    return index[:, None], weight[:, None], output


SWITCH_BATCH = 2


def test_switch_transformers_perft_e_reads_the_top1_routing_and_its_capacity():
    """Switch's experts get a one-hot mask, not indices: PERFT-E reads the routing from the router, and tokens
    dropped by the expert capacity get no adapter term (as they get no expert)."""
    config = tiny_config("switch_transformers")
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(
        type(config)(**{**config.to_dict(), "expert_capacity": 2})
    )
    randomise_router(model.encoder.block[1].layer[1].mlp.router, seed=7)
    block = adapted_blocks(model, perft("E"))["encoder.block.1.layer.1.mlp"]
    x = hidden_states(tokens=12)
    index = assert_perft_e_follows_the_reference_routing(block, x, switch_reference)
    dropped = block.routing_records["default"].expert_weight == 0
    assert dropped.any() and not dropped.all(), "the capacity must drop some tokens and keep others"
    assert len(set(index.flatten().tolist())) > 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_ernie_vl_vision_expert_group_trains_on_image_tokens(variant: str):
    """ERNIE-4.5-VL routes image tokens to its vision expert group (narrower experts) and text tokens to its text
    group: with tokens of both kinds, both groups' adapters get gradients, and the reload reproduces the output."""
    inputs = {**_inputs(_pristine_model("ernie4_5_vl_moe"))}
    inputs["moe_mm_token_type_ids"] = (torch.arange(6) >= 3).long().expand(2, 6)  # the last three tokens: image
    peft_model = get_peft_model(tiny_model("ernie4_5_vl_moe"), _perft_config(variant))
    groups = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, PerftMoeBlock)}
    assert groups == {"text_moe", "vision_moe"}
    peft_model.train()
    _output(peft_model, inputs).pow(2).mean().backward()
    for group in groups:
        grads = [p.grad for n, p in peft_model.named_parameters() if f".{group}." in n and ".perft_" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), f"{group} adapters got no gradient"
    peft_model.eval()
    adapted = _no_grad_output(peft_model, inputs)
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(tiny_model("ernie4_5_vl_moe"), directory).eval()
    torch.testing.assert_close(_no_grad_output(reloaded, inputs), adapted, rtol=1e-5, atol=1e-5)


TEXT_EXPERTS, VISION_EXPERTS = [1, 3], [0, 2]
IMAGE_TOKEN = 5


def _ernie_with_known_routing(variant: str) -> PeftModel:
    """The tiny ERNIE-4.5-VL, adapted, whose routers' score-correction biases send every text token to text experts
    1 and 3 and every image token to vision experts 0 and 2, whatever the hidden states."""
    peft_model = get_peft_model(tiny_model("ernie4_5_vl_moe"), _perft_config(variant))
    for name, module in peft_model.named_modules():
        if isinstance(module, PerftMoeBlock):
            chosen = TEXT_EXPERTS if name.endswith("text_moe") else VISION_EXPERTS
            bias = module.base_layer.gate.moe_statics.e_score_correction_bias
            bias.data.zero_()
            bias.data[:, chosen] = 50.0
    return peft_model


def _ernie_image_text_batch() -> dict[str, torch.Tensor]:
    """Two sequences of six tokens, the last three image tokens (id 5, type 1); no text token has id 5."""
    input_ids = _inputs(_pristine_model("ernie4_5_vl_moe"))["input_ids"].clone()
    input_ids[input_ids == IMAGE_TOKEN] = IMAGE_TOKEN + 1
    image = (torch.arange(6) >= 3).expand(2, 6)
    input_ids[image] = IMAGE_TOKEN
    return {"input_ids": input_ids, "moe_mm_token_type_ids": image.long()}


@pytest.mark.parametrize("variant", ["R", "E"])
def test_ernie_vl_trace_pairs_each_expert_group_with_its_own_tokens(variant: str):
    """Each token's row comes from the expert group that processed it: text tokens from ``text_moe`` with experts
    {1, 3}, image tokens from ``vision_moe`` with {0, 2} (set by construction); PERFT's rows are the group block's
    own records in token order; a text-only input gets no row from the vision group's earlier forward."""
    peft_model = _ernie_with_known_routing(variant)
    batch = _ernie_image_text_batch()
    trace = routing_trace(peft_model, batch)
    blocks = {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, PerftMoeBlock)}
    layers = sorted({row["layer"] for row in trace.rows})
    assert len(trace.rows) == 2 * 6 * len(layers), "one row per token and layer, from one group only"
    image = batch["moe_mm_token_type_ids"].reshape(-1).bool()
    for row in trace.rows:
        is_image = row["token_id"] == IMAGE_TOKEN
        assert row["module"].endswith("vision_moe" if is_image else "text_moe")
        assert sorted(row["base_experts"]) == (VISION_EXPERTS if is_image else TEXT_EXPERTS)
        received = image if is_image else ~image
        rank = int(received[: row["example"] * 6 + row["position"]].sum())
        recorded = blocks[row["module"]].routing_records["default"].expert_index[rank].tolist()
        assert row["perft_experts"] == recorded
        if variant == "E":
            assert row["perft_experts"] == row["base_experts"]

    text_only = routing_trace(peft_model, {"input_ids": batch["input_ids"].clamp(min=IMAGE_TOKEN + 1)})
    assert {row["module"].rsplit(".", 1)[-1] for row in text_only.rows} == {"text_moe"}
    assert len(text_only.rows) == 2 * 6 * len(layers)


def test_ernie_vl_modality_load_counts_each_group_in_its_own_columns():
    """Text and vision experts are different experts: the modality load gives the vision group its own columns
    (4 + index), so image tokens load columns 4 and 6, text tokens 1 and 3, and the two modalities never overlap."""
    trace = routing_trace(_ernie_with_known_routing("R"), _ernie_image_text_batch())
    load = modality_load(trace, {IMAGE_TOKEN: "image"})
    assert load.modalities == ("text", "image") and load.num_experts == 2 * TINY_EXPERTS
    expected = torch.zeros(2, TINY_EXPERTS * 2)
    expected[0, TEXT_EXPERTS] = 2 * 3  # 2 sequences x 3 text tokens, each choosing both text experts
    expected[1, [TINY_EXPERTS + e for e in VISION_EXPERTS]] = 2 * 3
    for layer in range(len(load.layers)):
        torch.testing.assert_close(load.counts[:, layer], expected, rtol=0, atol=0)
    torch.testing.assert_close(load.overlap(), torch.zeros(len(load.layers)))


VISION_WIDTH = 16


def _dots3_with_narrow_vision_experts() -> torch.nn.Module:
    """dots.3 whose vision encoder (one MoE layer, 4 experts) is narrower than its language model, as in the real
    model (1536 vs 5120)."""
    config = tiny_config("dots3_note").to_dict()
    config["vision_config"].update(hidden_size=VISION_WIDTH, adapter_in_dim=VISION_WIDTH)
    torch.manual_seed(0)
    return transformers.Dots3NoteForConditionalGeneration(type(tiny_config("dots3_note"))(**config)).eval()


def _vision_output(model: torch.nn.Module) -> torch.Tensor:
    """The vision encoder's output on four 14-pixel patches (a 2 x 2 grid, one image)."""
    pixels = torch.randn(4, 3 * 14 * 14, generator=torch.Generator().manual_seed(2))
    tower = (model.get_base_model() if isinstance(model, PeftModel) else model).model.vision_tower
    return tower(pixels, torch.tensor([[1, 2, 2]])).last_hidden_state


@pytest.mark.parametrize("variant", VARIANTS)
def test_dots3_vision_encoder_experts_are_adapted_at_their_own_width(variant: str):
    """dots.3's vision encoder has MoE layers of its own width: they are adapted (not refused as a misread width),
    their adapters train on image patches, change the encoder's output and reload exactly."""
    base = _vision_output(_dots3_with_narrow_vision_experts()).detach()
    peft_model = get_peft_model(_dots3_with_narrow_vision_experts(), _perft_config(variant))
    blocks = {n: m for n, m in peft_model.named_modules() if isinstance(m, PerftMoeBlock)}
    vision = [m for n, m in blocks.items() if ".vision_tower." in n]
    assert len(vision) == 1 and vision[0].spec.hidden_size == VISION_WIDTH and len(blocks) == 3
    peft_model.train()
    _vision_output(peft_model).pow(2).mean().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if ".vision_tower." in n and ".perft_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    peft_model.eval()
    with torch.no_grad():
        adapted = _vision_output(peft_model)
    assert not torch.allclose(adapted, base, atol=1e-6)
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(_dots3_with_narrow_vision_experts(), directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(_vision_output(reloaded), adapted, rtol=1e-5, atol=1e-5)


def test_ernie_vl_routing_monitor_counts_each_group_on_its_own_real_tokens():
    """The routing monitor counts an expert group's choices on the tokens that group received, padding left out,
    and a group that got no token in a forward (the vision experts on text only) does not count its last records
    again: text experts 1 and 3 see 5 + 12 real tokens, vision experts 0 and 2 see 6, for base and PERFT-R alike."""
    peft_model = _ernie_with_known_routing("R").eval()
    image_batch = _ernie_image_text_batch()
    image_batch["attention_mask"] = torch.ones(2, 6, dtype=torch.long)
    image_batch["attention_mask"][1, 0] = 0  # one padded text token
    with RoutingMonitor(peft_model) as monitor, torch.no_grad():
        peft_model(**image_batch)
        peft_model(input_ids=image_batch["input_ids"].clamp(min=IMAGE_TOKEN + 1))
        report = monitor.read()
    groups = {(stats.module.rsplit(".", 1)[-1], stats.router) for stats in report.routers}
    assert groups == {(group, router) for group in ("text_moe", "vision_moe") for router in ("base", "perft")}
    for stats in report.routers:
        text = stats.module.endswith("text_moe")
        assert stats.tokens == (5 + 12 if text else 6), (stats.module, stats.router)
        if stats.router == "base":
            assert stats.load == pytest.approx([0.0, 1.0, 0.0, 1.0] if text else [1.0, 0.0, 1.0, 0.0])
