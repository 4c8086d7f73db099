"""What only a GPU can show, run by scripts/gpu_session.sh: a bf16 training step compiled with fullgraph=True on
CUDA equals eager for every variant (the CPU's compiled checks are tests/test_compile.py), and the meta-device flow
materialised on CUDA in bf16 equals the adapter built on CUDA directly and trains there (on the CPU:
tests/test_meta_device.py). Skipped, with the reason shown, where there is no CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, tiny_olmoe_config
from peft import get_peft_model
from transformers import OlmoeForCausalLM

from peft_perft import PerftConfig

NO_CUDA_REASON = "needs a CUDA device (scripts/gpu_session.sh runs it on the lent GPU)"
VARIANTS = ["R", "E", "D", "S"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)
@pytest.mark.parametrize(
    ("variant", "backend"), [("R", "aot_eager"), ("E", "inductor"), ("D", "aot_eager"), ("S", "aot_eager")]
)
def test_compiled_bf16_training_step_on_the_gpu_matches_eager(variant: str, backend: str, tokens: torch.Tensor):
    """One graph (fullgraph=True) on CUDA in bf16: Inductor's CUDA code for E, the tracing for the others."""
    sizes = {"num_experts": 4, "top_k": 2} if variant == "R" else {}
    config = PerftConfig(variant=variant, r=8, init_weights=False, **sizes)
    model = get_peft_model(build_tiny().to(device="cuda", dtype=torch.bfloat16), config, autocast_adapter_dtype=False)
    model.train()
    eager = copy.deepcopy(model)
    input_ids = tokens.cuda()
    loss = torch.compile(model, fullgraph=True, backend=backend)(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    expected = eager(input_ids=input_ids, labels=input_ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    expected_gradients = {name: p.grad for name, p in eager.named_parameters() if p.grad is not None}
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert gradients.keys() == expected_gradients.keys() and gradients
    for name, gradient in gradients.items():
        scale = expected_gradients[name].abs().max().item()
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=0, atol=3e-2 * max(scale, 1e-3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)
@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device_flow_materialised_on_the_gpu_equals_the_adapter_built_there_and_trains(
    variant: str, tokens: torch.Tensor
) -> None:
    config = PerftConfig(variant=variant, r=8, init_weights=False)
    real_base = build_tiny().to(device="cuda", dtype=torch.bfloat16)
    base_state = {key: tensor.clone() for key, tensor in real_base.state_dict().items()}
    torch.manual_seed(7)
    real = get_peft_model(real_base, config, autocast_adapter_dtype=False)
    with torch.device("meta"):
        meta_base = OlmoeForCausalLM(tiny_olmoe_config()).to(torch.bfloat16)
    deferred = get_peft_model(meta_base, config, autocast_adapter_dtype=False)
    assert all(p.is_meta for name, p in deferred.named_parameters() if ".perft_" in name)
    names = {key.replace(".base_layer.", "."): key for key in deferred.get_base_model().state_dict()}
    deferred.to_empty(device="cuda")
    deferred.get_base_model().initialize_weights()
    deferred.get_base_model().load_state_dict({names[k]: v for k, v in base_state.items()}, strict=False)
    torch.manual_seed(7)
    deferred.init_perft_weights()
    expected = {name: p for name, p in real.named_parameters() if ".perft_" in name}
    found = {name: p for name, p in deferred.named_parameters() if ".perft_" in name}
    assert found.keys() == expected.keys()
    for name, parameter in expected.items():
        assert found[name].is_cuda and found[name].dtype == torch.bfloat16, name
        assert torch.equal(found[name], parameter), name
    input_ids = tokens.cuda()
    loss = deferred(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.is_cuda and p.grad.abs().sum() > 0 for p in found.values())
