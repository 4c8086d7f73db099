"""Every path that adds a PERFT adapter's term computes it with the one shared function, `terms.adapter_delta`.

Each test runs a path once as it is, against a term written out by hand (or the base model), and once with that
function replaced by one that returns its own result times zero: a path whose delta comes from the function then
adds nothing. A path that computed its delta another way (its own routing, top-k, scaling or dropout) would keep
adding it, and fail here. The distributed paths run on a one-rank process group, where a shard is the whole tensor,
so their term must equal the one-process term exactly as written out by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model
from test_architectures import _input_ids, _single_thread, tiny_model  # noqa: F401
from test_dispatch import reference_routed
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from peft_perft import PerftConfig, PerftMoeBlock, terms
from peft_perft.dispatch import in_experts
from peft_perft.parallel import expert_parallel, tensor_parallel
from peft_perft.parallel.token_slices import TokenRowTerms

CONFIGS = {
    "R": {"variant": "R", "num_experts": 4, "top_k": 2},
    "D": {"variant": "D", "num_experts": 2},
    "S": {"variant": "S"},
    "E": {"variant": "E"},
}


@pytest.fixture
def silence(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make `terms.adapter_delta` return zeros (computed from its real result, so records still run)."""
    original = terms.adapter_delta

    def zero_delta(*args, **kwargs) -> torch.Tensor:
        return original(*args, **kwargs) * 0

    return lambda: monkeypatch.setattr(terms, "adapter_delta", zero_delta)


@pytest.fixture
def one_rank_mesh() -> Iterator[DeviceMesh]:
    """A process group of this process alone, and its mesh: DTensors whose one shard is the whole tensor."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def adapted_block(variant: str, model_type: str = "olmoe") -> PerftMoeBlock:
    torch.manual_seed(0)
    config = PerftConfig(r=4, lora_alpha=8, init_weights=False, **CONFIGS[variant])
    model = get_peft_model(tiny_model(model_type), config)
    return next(module for module in model.modules() if isinstance(module, PerftMoeBlock))


def hand_term(block: PerftMoeBlock, hidden: torch.Tensor, routing: tuple | None = None) -> torch.Tensor:
    """The default adapter's unscaled term, one token and expert at a time (`reference_routed`): PERFT-R's routing
    from its router (softmax, top-k, renormalised), D and S as every expert with weight 1, E with ``routing``."""
    config = block.perft_configs["default"]
    lora_A, lora_B = (_whole(tensors["default"]).detach() for tensors in (block.perft_A, block.perft_B))
    tokens, num_experts = hidden.shape[0], lora_A.shape[0]
    if config.variant == "R":
        probs = torch.softmax(hidden @ block.perft_router["default"].detach().t(), dim=-1)
        weight, index = probs.topk(config.top_k, dim=-1)
        routing = index, weight / weight.sum(-1, keepdim=True)
    elif config.variant in ("D", "S"):
        routing = torch.arange(num_experts).expand(tokens, num_experts), torch.ones(tokens, num_experts)
    return reference_routed(hidden, lora_A, lora_B, *routing, None)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize(
    ("model_type", "variant"),
    [("olmoe", "R"), ("olmoe", "D"), ("olmoe", "S"), ("olmoe", "E"), ("jetmoe", "E")],
    ids=["R", "D", "S", "E-experts-hook", "E-router-hook"],
)
def test_one_process_block_adds_the_shared_term(model_type: str, variant: str, silence) -> None:
    """The block's own terms (R, D, S on its output; E after the experts, or on the output where the router
    carries the routing, as JetMoE's does)."""
    torch.manual_seed(0)
    config = PerftConfig(r=4, lora_alpha=8, init_weights=False, **CONFIGS[variant])
    model = get_peft_model(tiny_model(model_type), config).eval()
    if hasattr(model.get_base_model(), "set_experts_implementation"):
        model.get_base_model().set_experts_implementation("eager")  # the experts hook, not the in-dispatch path
    input_ids = _input_ids()
    with model.disable_adapter():
        base = _logits(model, input_ids)
    adapted = _logits(model, input_ids)
    silence()
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, input_ids), base, rtol=1e-6, atol=1e-6)


def test_in_dispatch_path_adds_the_shared_term(monkeypatch: pytest.MonkeyPatch, silence) -> None:
    """PERFT-E inside the experts' grouped_mm dispatch: its per-pair term is the shared function's result."""
    fused: list[int] = []
    original = in_experts.grouped_experts_with_adapters
    monkeypatch.setattr(in_experts, "grouped_experts_with_adapters", lambda *a: fused.append(1) or original(*a))
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("qwen3_moe"), PerftConfig(variant="E", r=4, init_weights=False)).eval()
    input_ids = _input_ids()
    with model.disable_adapter():
        base = _logits(model, input_ids)
    adapted = _logits(model, input_ids)
    blocks = len(fused)
    silence()
    silenced = _logits(model, input_ids)
    assert blocks and len(fused) == 2 * blocks, "every adapted block of both forwards must run in the dispatch"
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(silenced, base, rtol=1e-5, atol=1e-5)


def split_over_one_rank(model: nn.Module, mesh: DeviceMesh) -> None:
    """Each block's default adapter split on its bottleneck over a one-rank TP mesh and computed by
    `SplitBlockTerms` (R, D, S) or `TensorParallelExperts` (E), by the very code that does it under ``tp_size`` once
    `parallel.prepare` found Transformers' TP mesh: the mesh on the experts modules, then
    `split_over_tensor_parallel`."""
    for block in (module for module in model.modules() if isinstance(module, PerftMoeBlock)):
        experts = block.spec.experts_module(block.base_layer)
        tensor_parallel.attach_tensor_parallel_mesh([experts], mesh)
        assert tensor_parallel.split_over_tensor_parallel(block, "default")
        assert isinstance(block.perft_A["default"], DTensor)
        routed = block.perft_configs["default"].follows_base_routing
        assert (tensor_parallel.TensorParallelExperts.of(experts) is not None) == routed
        assert isinstance(block.split_terms, tensor_parallel.SplitBlockTerms) != routed


def test_a_deleted_split_adapter_leaves_no_owner_behind(one_rank_mesh: DeviceMesh) -> None:
    """``delete_adapter`` drops the block's record of the layout that split the adapter, so a later adapter of the
    same name that no layout splits (odd ``r`` under two TP ranks, say) is not sent to the split path."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("olmoe"), PerftConfig(r=4, init_weights=False, **CONFIGS["S"])).eval()
    split_over_one_rank(model, one_rank_mesh)
    model.add_adapter("other", PerftConfig(r=4, init_weights=False, **CONFIGS["S"]))
    blocks = [module for module in model.modules() if isinstance(module, PerftMoeBlock)]
    both = {"default": tensor_parallel.OWNER, "other": tensor_parallel.OWNER}
    assert blocks and all(block.term_owners == both for block in blocks)
    model.delete_adapter("default")
    assert all(block.term_owners == {"other": tensor_parallel.OWNER} for block in blocks)


@pytest.mark.parametrize("variant", ["R", "S", "E"])
def test_tensor_parallel_split_adds_the_shared_term(variant: str, one_rank_mesh: DeviceMesh, silence) -> None:
    """The sum over the TP ranks of each split adapter's partial term, added to the block's output (R, S) or the
    experts' (E): on one rank the whole term, so the logits are the one-process model's."""
    torch.manual_seed(0)
    config = PerftConfig(r=4, lora_alpha=8, init_weights=False, **CONFIGS[variant])
    model = get_peft_model(tiny_model("olmoe"), config).eval()
    model.get_base_model().set_experts_implementation("eager")
    input_ids = _input_ids()
    one_process = _logits(model, input_ids)
    with model.disable_adapter():
        base = _logits(model, input_ids)
    split_over_one_rank(model, one_rank_mesh)
    torch.testing.assert_close(_logits(model, input_ids), one_process, rtol=1e-5, atol=1e-5)
    silence()
    assert (one_process - base).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, input_ids), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["R", "D"])
def test_token_rows_add_the_shared_term(variant: str, one_rank_mesh: DeviceMesh, silence) -> None:
    """`TokenRowTerms` (TP with EP) on this rank's rows; here all rows, a TP group of one."""
    block = adapted_block(variant)
    hidden = torch.randn(5, block.spec.hidden_size)

    def added() -> torch.Tensor:
        return TokenRowTerms(block, one_rank_mesh)(["default"], hidden)

    scaling = block.perft_configs["default"].scaling
    torch.testing.assert_close(added(), scaling * hand_term(block, hidden), rtol=1e-4, atol=1e-5)
    silence()
    assert not added().any()


def test_expert_parallel_dispatch_adds_the_shared_term(one_rank_mesh: DeviceMesh, silence) -> None:
    """`PerftExpertParallel`'s experts forward: the local adapter experts on the tokens the dispatch brought."""
    block = adapted_block("E")
    for tensors in (block.perft_A, block.perft_B):
        tensors["default"] = nn.Parameter(distribute_tensor(tensors["default"].data, one_rank_mesh, [Shard(0)]))
    block.term_owners["default"] = expert_parallel.OWNER
    dispatch = object.__new__(expert_parallel.PerftExpertParallel)
    dispatch.block, dispatch.num_local_experts = block, block.perft_A["default"].shape[0]
    dispatch.experts_forward = lambda tokens, index, weights: torch.zeros_like(tokens)
    hidden = torch.randn(5, block.spec.hidden_size)
    routing = torch.randint(0, dispatch.num_local_experts, (5, 2)), torch.rand(5, 2)

    def added() -> torch.Tensor:
        block._experts_call_adapters[:] = ["default"]
        return dispatch._experts_with_adapters(hidden, *routing)

    scaling = block.perft_configs["default"].scaling
    torch.testing.assert_close(added(), scaling * hand_term(block, hidden, routing), rtol=1e-4, atol=1e-5)
    silence()
    assert not added().any()
