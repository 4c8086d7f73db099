"""Routing by modality on a tiny vision-language MoE model: image and text tokens' expert loads, per layer.

The reference is independent of the trace: the base router's weights applied to each MoE block's input (captured by
a pre-hook), top-k of its softmax, grouped by whether the token is an image placeholder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.monitor import ModalityLoad, draw_modality_load, modality_load, routing_trace, stack_load

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "vlm_perft.py"
IMAGE_SIDE = 64  # 4 x 4 patches of 16 pixels, merged 2 x 2: four image tokens per image


def load_example():
    spec = importlib.util.spec_from_file_location("example_vlm_perft_modality", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def traced() -> dict:
    """A PERFT-R adapted tiny Qwen3-VL-MoE traced on two image-text examples, with the reference routing."""
    example = load_example()
    model = get_peft_model(
        example.tiny_qwen3_vl_moe(), PerftConfig(variant="R", r=4, num_experts=3, top_k=2, init_weights=False)
    )
    area = IMAGE_SIDE * IMAGE_SIDE
    processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=area, max_pixels=area
    )
    collator = example.ImageTextCollator(processor, example.tiny_tokenizer(), example.image_tokens_of(model))
    generator = np.random.default_rng(0)
    rows = [
        {"picture": Image.fromarray(generator.integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)),
         "prompt": prompt, "completion": " red."}
        for prompt in ("colour?", "what is it?")
    ]  # fmt: skip
    batch = collator(rows)
    batch.pop("labels")
    block_inputs = {}
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, PerftMoeBlock)}
    handles = [
        block.register_forward_pre_hook(lambda module, args, name=name: block_inputs.__setitem__(name, args[0]))
        for name, block in blocks.items()
    ]
    trace = routing_trace(model, batch)
    for handle in handles:
        handle.remove()
    return {"model": model, "batch": batch, "trace": trace, "blocks": blocks, "inputs": block_inputs}


def reference_counts(traced: dict, image_token: int) -> torch.Tensor:
    """(modality [text, image], layer, expert) counts from the routers' weights, top-2 of the softmax."""
    is_image = (traced["batch"]["input_ids"] == image_token).reshape(-1)
    keep = traced["batch"]["attention_mask"].reshape(-1).bool()
    counts = []
    for name, block in traced["blocks"].items():
        hidden = traced["inputs"][name].reshape(-1, 32)
        chosen = torch.softmax(hidden @ block.base_layer.gate.weight.t(), dim=-1).topk(2, dim=-1).indices
        per_modality = [torch.bincount(chosen[keep & (is_image == flag)].flatten(), minlength=4) for flag in (0, 1)]
        counts.append(torch.stack(per_modality))
    return torch.stack(counts, dim=1).float()


def test_base_expert_load_by_modality_matches_the_routers(traced: dict) -> None:
    image_token = traced["model"].config.image_token_id
    load = modality_load(traced["trace"], {image_token: "image"}, num_experts=4)
    assert load.modalities == ("text", "image") and load.layers == (0, 1)
    torch.testing.assert_close(load.counts, reference_counts(traced, image_token), rtol=0, atol=0)
    assert load.counts[1].sum() == 2 * 2 * 2 * 4, "2 examples x 4 image tokens x 2 slots, per layer x 2 layers"
    torch.testing.assert_close(load.shares().sum(dim=-1), torch.full((2, 2), 2.0))


def test_perft_r_router_split_by_modality(traced: dict) -> None:
    """PERFT-R's own router: every token of each modality chose 2 of its 3 experts in each layer, and the counts
    agree with the routing the blocks recorded (padding left out, as the trace leaves it out)."""
    image_token = traced["model"].config.image_token_id
    load = modality_load(traced["trace"], {image_token: "image"}, source="perft", num_experts=3)
    is_image = (traced["batch"]["input_ids"] == image_token).reshape(-1)
    keep = traced["batch"]["attention_mask"].reshape(-1).bool()
    for layer, block in enumerate(traced["blocks"].values()):
        recorded = block.routing_records["default"].expert_index
        for modality, flag in (("text", 0), ("image", 1)):
            expected = torch.bincount(recorded[keep & (is_image == flag)].flatten(), minlength=3).float()
            torch.testing.assert_close(load.counts[load.modalities.index(modality), layer], expected)
            assert expected.sum() == 2 * int((keep & (is_image == flag)).sum())


def test_overlap_is_one_for_equal_loads_and_zero_for_disjoint_experts() -> None:
    same = torch.tensor([[[2.0, 2.0, 0.0, 0.0]], [[4.0, 4.0, 0.0, 0.0]]])
    disjoint = torch.tensor([[[2.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 3.0, 3.0]]])
    for counts, expected in ((same, 1.0), (disjoint, 0.0)):
        load = ModalityLoad(("text", "image"), (0,), counts, top_k=2)
        torch.testing.assert_close(load.overlap(), torch.tensor([expected]))


def test_modality_picture_is_drawn(traced: dict, tmp_path: Path) -> None:
    load = modality_load(traced["trace"], {traced["model"].config.image_token_id: "image"}, num_experts=4)
    path = draw_modality_load(load, tmp_path / "modality.png", "tiny Qwen3-VL-MoE", "2 image-text examples.")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"


def test_encoder_and_decoder_blocks_are_traced_on_their_own_tokens(tmp_path: Path) -> None:
    """Switch Transformers: encoder blocks route input_ids, decoder blocks decoder_input_ids (of another length);
    each row's base expert is the router's argmax on that block's input, and stack_load splits the two stacks."""
    from test_architectures_multimodal import tiny_model

    model = get_peft_model(tiny_model("switch_transformers"), PerftConfig(variant="R", r=4, num_experts=3, top_k=2))
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, PerftMoeBlock)}
    inputs = {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
        for name, block in blocks.items()
    ]
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="encoder-decoder model: pass a mapping with input_ids .*decoder_input_ids"):
        routing_trace(model, {"input_ids": ids})
    trace = routing_trace(model, {"input_ids": ids, "decoder_input_ids": ids[:, :3].flip(-1)})
    for handle in handles:
        handle.remove()
    for name, block in blocks.items():
        module = name.removeprefix("base_model.model.")
        rows = [row for row in trace.rows if row["module"] == module and row["adapter"] == "default"]
        expected_ids = ids[:, :3].flip(-1) if ".decoder." in f".{module}" else ids
        assert [row["token_id"] for row in rows] == expected_ids.flatten().tolist()
        logits = inputs[name].reshape(-1, 32) @ block.base_layer.router.classifier.weight.t()
        assert [row["base_experts"] for row in rows] == logits.argmax(dim=-1)[:, None].tolist()
    load = stack_load(trace, num_experts=4)
    assert load.modalities == ("encoder", "decoder") and load.layers == (1,)
    assert load.counts[0].sum() == 5 and load.counts[1].sum() == 3
    picture = draw_modality_load(
        load, tmp_path / "stacks.png", "Switch", "one pair.", modalities=("encoder", "decoder")
    )
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_trace_reads_the_routing_from_the_router_where_the_experts_call_lacks_it() -> None:
    """Llama 4's experts are called without the routing: the trace takes the base routing from the router's output,
    and it equals the top-k of the router's logits on each block's input."""
    from test_architectures import tiny_model

    model = get_peft_model(tiny_model("llama4"), PerftConfig(variant="R", r=4, num_experts=3, top_k=2))
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, PerftMoeBlock)}
    inputs = {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
        for name, block in blocks.items()
    ]
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    trace = routing_trace(model, {"input_ids": ids})
    for handle in handles:
        handle.remove()
    for layer, (name, block) in enumerate(blocks.items()):
        logits = inputs[name].reshape(-1, 32) @ block.base_layer.router.weight.t()
        expected = logits.topk(2, dim=-1).indices.sort(dim=-1).values.tolist()
        rows = [row for row in trace.rows if row["layer"] == layer]
        assert [sorted(row["base_experts"]) for row in rows] == expected
