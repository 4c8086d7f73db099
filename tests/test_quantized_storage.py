"""MoE blocks found from logical shapes whatever the storage, and no silent PERFT-E no-op.

The oracle is always the same model in plain storage: packed, partitioned or sharded copies of it must give the
same block specs. A block whose width cannot be read right must raise, naming the block; an E adapter whose hook
cannot run must raise at the forward, never add nothing.
"""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny, tiny_gpt_oss_config
from peft import get_peft_model
from test_architectures import _perft_config, _single_thread, tiny_model  # noqa: F401 (_single_thread: autouse)
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_perft.architectures import find_moe_blocks
from peft_perft.quantization import keep_small_4bit_layers_unpacked

BNB4_ROUTER_CASES = ("afmoe", "dbrx", "gemma4", "hunyuan_v1_moe", "jetmoe", "longcat_flash", "zaya", "doge")
"""Architectures whose routers are nn.Linear, which bitsandbytes 4-bit packs to (rows * cols / 2, 1) bytes."""


def bnb4(model: nn.Module) -> nn.Module:
    """``model`` saved and loaded back with bitsandbytes NF4, as from the Hub."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        return type(model).from_pretrained(directory, quantization_config=config, device_map="cpu")


BNB4_BASE_FAILS = {
    "longcat_flash": "its router multiplies by classifier.weight directly (F.linear), bypassing Linear4bit's forward, "
    "so the 4-bit base itself fails; keep the router unquantized: BitsAndBytesConfig(llm_int8_skip_modules=["
    "'classifier', 'lm_head'])",
}
"""Quantized bases whose own forward fails in Transformers, PERFT or not (checked below)."""


def sample_ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", BNB4_ROUTER_CASES)
def test_bnb4_packed_routers_give_the_blocks_of_the_plain_model(model_type: str):
    plain = tiny_model(model_type)
    quantized = bnb4(plain)
    blocks = find_moe_blocks(quantized)
    assert blocks == find_moe_blocks(plain)
    name, spec = next(iter(blocks.items()))
    owner = name.rpartition(".")[0] if spec.experts_name == "" else name  # Gemma 4: the router sits beside the experts
    routers = [p for p in quantized.get_submodule(owner).get_submodule(spec.router_name).parameters()]
    routers = [p for p in routers if type(p).__name__ == "Params4bit"]
    assert routers and routers[0].shape[1] == 1, "the router weight must really be packed for this test to mean much"
    peft_model = get_peft_model(quantized, _perft_config("S"))
    if model_type in BNB4_BASE_FAILS:
        with pytest.raises(RuntimeError, match="cannot be multiplied"), peft_model.disable_adapter():
            peft_model(input_ids=sample_ids())
        return
    peft_model(input_ids=sample_ids(), labels=sample_ids()).loss.backward()
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if ".perft_" in name)


def test_4bit_layers_bitsandbytes_cannot_repack_for_its_cpu_kernel_keep_the_generic_one():
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel and fails on layers narrower than its
    blocks (routers, tiny layers); PERFT turns the repacking off there, and the model computes what the generic 4-bit
    kernel computes. The CPU feature is forced on, as bitsandbytes sets it on such a CPU, so this runs on any CPU."""
    quantized = bnb4(tiny_model("dbrx")).eval()
    layers = {name: m for name, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"}
    router_name = next(name for name in layers if name.endswith("router.layer"))
    with torch.no_grad():
        for layer in layers.values():
            layer.support_avx512bf16_for_cpu = False
        expected = quantized(input_ids=sample_ids()).logits
        for layer in layers.values():
            layer.support_avx512bf16_for_cpu = True
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            copy.deepcopy(quantized)(input_ids=sample_ids())
        skipped = keep_small_4bit_layers_unpacked(quantized)
        assert router_name in skipped and set(skipped) <= set(layers)
        torch.testing.assert_close(quantized(input_ids=sample_ids()).logits, expected)


def as_zero3_placeholders(model: nn.Module) -> nn.Module:
    """Partition every parameter as DeepSpeed's zero.Init leaves it on a rank: data of shape (0,), the real
    shape in ``ds_shape`` (and the count in ``ds_numel``)."""
    for parameter in model.parameters():
        parameter.ds_shape, parameter.ds_numel = parameter.shape, parameter.numel()
        parameter.data = torch.empty(0, dtype=parameter.dtype)
    return model


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "dbrx", "hunyuan_v1_moe", "gemma4", "zaya", "doge"])
def test_zero3_placeholders_give_the_blocks_of_the_plain_model(model_type: str):
    expected = find_moe_blocks(tiny_model(model_type))
    placeholders = as_zero3_placeholders(tiny_model(model_type))
    assert all(p.shape == (0,) for p in placeholders.parameters())
    assert find_moe_blocks(placeholders) == expected


@pytest.fixture
def fake_two_rank_mesh():
    """A 2-rank device mesh on torch's fake process group: DTensors with half-sized local shards, no processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def test_dtensor_shards_give_the_blocks_of_the_plain_model(fake_two_rank_mesh):
    """Experts sharded on the expert dimension, the router on its rows (as EP / TP shard them): each rank holds
    half, the DTensors report the global shape."""
    from torch.distributed.tensor import DTensor, Shard

    model = build_tiny("olmoe")
    expected = find_moe_blocks(model)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() >= 2 and ("experts" in name or "proj" in name or module is not model):
                local = parameter.detach().chunk(2, dim=0)[0].clone()
                sharded = DTensor.from_local(local, fake_two_rank_mesh, [Shard(0)], run_check=False)
                setattr(module, name, nn.Parameter(sharded, requires_grad=False))
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(experts, DTensor) and experts.to_local().shape[0] == 2
    assert find_moe_blocks(model) == expected


def test_fp4_packed_experts_keep_perft_e():
    """Experts stored as FP4 packers store them, two values per byte along the input width, still work at the
    block's hidden size: PERFT-E is not refused for a halved width."""
    model = build_tiny("olmoe")
    experts = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        packed = torch.zeros(*weight.shape[:-1], weight.shape[-1] // 2, dtype=torch.uint8)
        setattr(experts, name, nn.Parameter(packed, requires_grad=False))
    spec = find_moe_blocks(model)["model.layers.0.mlp"]
    assert spec.experts_hidden_size == spec.hidden_size == 32 and spec.experts_routable
    get_peft_model(model, _perft_config("E"))


def test_block_width_that_disagrees_with_the_config_is_an_error_naming_the_block():
    model = build_tiny("olmoe")
    gate = model.model.layers[1].mlp.gate
    gate.weight = nn.Parameter(torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp' was detected with hidden size 16.*hidden_size=32"):
        find_moe_blocks(model)


def mxfp4_gpt_oss(monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """Tiny GPT-OSS whose MoE block is Transformers' MXFP4 one: it routes with the Triton kernels' routing and calls
    ``experts.forward_routed``, never ``experts.forward``. The GPU-only kernels are replaced by zero-returning
    stand-ins: what matters here is which experts method the block calls."""
    from transformers.integrations import mxfp4

    torch.manual_seed(0)
    config = tiny_gpt_oss_config()
    model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    layer.mlp = mxfp4.Mxfp4GptOssMLP(layer.mlp.router, mxfp4.Mxfp4GptOssExperts(config))
    routing = SimpleNamespace(routing=lambda logits, top_k: (None, None, None))
    monkeypatch.setattr(mxfp4, "triton_kernels_hub", SimpleNamespace(routing=routing), raising=False)
    monkeypatch.setattr(mxfp4.Mxfp4GptOssExperts, "forward_routed", lambda self, h, *routing: torch.zeros_like(h))
    return model


def test_perft_e_whose_hook_never_runs_raises_naming_the_block(monkeypatch: pytest.MonkeyPatch):
    model = get_peft_model(mxfp4_gpt_oss(monkeypatch), _perft_config("E"))
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"added nothing in block 'model.layers.0.mlp'.*'experts' did not run"):
        model(input_ids=ids)
    with model.disable_adapter():
        model(input_ids=ids)


def test_block_variants_work_where_the_experts_bypass_forward(monkeypatch: pytest.MonkeyPatch):
    """R sits beside the whole block, so the MXFP4 experts' call path does not matter to it."""
    model = get_peft_model(mxfp4_gpt_oss(monkeypatch), _perft_config("R"))
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if ".perft_" in name)
