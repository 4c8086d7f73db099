"""Selective PERFT-E (``PerftConfig(variant="E", target_experts=...)``) is full PERFT-E restricted to the chosen
experts.

The reference is an independent full PERFT-E model with the same adapter values on the selected experts and the
other experts' adapters zeroed: the selective model must give its logits and, on every selected expert, its
gradients, while storing no tensor for the others; the base weights must not move. Checked through every PERFT-E
path: inside the experts' grouped_mm dispatch, after the experts call through each dispatch backend, the router
hook (Llama 4), a plain experts module (DBRX) and int8 experts.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from distributed import sharded_worker
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_architectures import _input_ids, _single_thread, tiny_model  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.dispatch import in_experts as experts_dispatch
from peft_perft.parallel.saving import gathered_adapter_state_dict

ADAPTER = {"r": 4, "lora_alpha": 8}
SELECTION = {"model.layers.0.mlp": [1, 3], "model.layers.1.mlp": [2]}
"""Two experts of four in the first block, one in the second (block names as PERFT finds the blocks)."""


def blocks_of(model: torch.nn.Module) -> dict[str, PerftMoeBlock]:
    return {module.block_name: module for module in model.modules() if isinstance(module, PerftMoeBlock)}


def selective_and_reference(
    base: torch.nn.Module, selection: dict[str, list[int]], **settings
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The selective model and its reference: full PERFT-E (random A and B) with the unselected experts' A and B
    zeroed, the selective adapter given the reference's values on its experts."""
    torch.manual_seed(0)
    reference = get_peft_model(copy.deepcopy(base), PerftConfig(variant="E", init_weights=False, **ADAPTER, **settings))
    selective = get_peft_model(
        copy.deepcopy(base),
        PerftConfig(variant="E", init_weights=False, target_experts=selection, **ADAPTER, **settings),
    )
    selected_blocks = blocks_of(selective)
    with torch.no_grad():
        for name, block in blocks_of(reference).items():
            chosen = selection.get(name, [])
            unselected = [index for index in range(block.spec.num_experts) if index not in chosen]
            for tensors in (block.perft_A, block.perft_B):
                tensors["default"][unselected] = 0
            if chosen:
                selected_blocks[name].perft_A["default"].copy_(block.perft_A["default"][chosen])
                selected_blocks[name].perft_B["default"].copy_(block.perft_B["default"][chosen])
    return selective, reference


def train_step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and adapter gradients of one training forward and backward, keyed by block name and tensor."""
    model.train()
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    gradients = {}
    for name, block in blocks_of(model).items():
        for tensor_name in ("perft_A", "perft_B"):
            gradients[name, tensor_name] = getattr(block, tensor_name)["default"].grad
    return output.logits.detach(), gradients


def assert_selective_equals_restricted_full(
    selective: torch.nn.Module, reference: torch.nn.Module, selection: dict[str, list[int]], **tolerance
) -> None:
    """Same logits; each selected expert's A and B gradients as the reference's; no tensor for the others; the
    base weights frozen and unchanged by an optimiser step."""
    tolerance = tolerance or {"rtol": 1e-5, "atol": 1e-6}
    base_before = {n: plain(p).clone() for n, p in selective.named_parameters() if ".perft_" not in n}
    input_ids = _input_ids()
    logits, gradients = train_step(selective, input_ids)
    reference_logits, reference_gradients = train_step(reference, input_ids)
    torch.testing.assert_close(logits, reference_logits, **tolerance)
    assert {name for name, _ in gradients} == {name for name, experts in selection.items() if experts}
    for (block, tensor_name), gradient in gradients.items():
        chosen = selection[block]
        assert gradient.shape[0] == len(chosen), "unselected experts must store nothing"
        torch.testing.assert_close(gradient, reference_gradients[block, tensor_name][chosen], **tolerance)
        assert gradient.abs().sum() > 0, f"{block}.{tensor_name}: the selected experts must train"
    trainable = [p for p in selective.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.1).step()
    for name, parameter in selective.named_parameters():
        if ".perft_" not in name:
            assert not parameter.requires_grad and parameter.grad is None, name
            assert torch.equal(plain(parameter), base_before[name]), name


def plain(parameter: torch.Tensor) -> torch.Tensor:
    """A weight's values as a plain tensor (int8 experts dequantized)."""
    values = parameter.detach()
    return values if type(values) in (torch.Tensor, torch.nn.Parameter) else values.dequantize()


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the in-dispatch computation (PERFT-E inside the experts' grouped_mm)."""
    calls: list[int] = []
    original = experts_dispatch.grouped_experts_with_adapters

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(experts_dispatch, "grouped_experts_with_adapters", counting)
    return calls


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_in_dispatch_path(family: str, fused_calls: list[int]):
    """Inside the experts' grouped_mm dispatch (the stored rows laid out per base expert for the kernel)."""
    base = build_tiny("olmoe") if family == "olmoe" else tiny_model(family)
    selective, reference = selective_and_reference(base, SELECTION)
    assert_selective_equals_restricted_full(selective, reference, SELECTION)
    assert len(fused_calls) == 2 * 2, "both models' two blocks must run PERFT-E inside grouped_mm"


@pytest.mark.parametrize("backend", ["dense", "gather", "grouped_mm"])
def test_after_the_experts_call_through_each_backend(backend: str, fused_calls: list[int]):
    """A named backend keeps PERFT-E out of the grouped dispatch: the block adds it after the experts call."""
    selective, reference = selective_and_reference(build_tiny("mixtral"), SELECTION, dispatch_backend=backend)
    assert_selective_equals_restricted_full(selective, reference, SELECTION)
    assert not fused_calls


@pytest.mark.parametrize("model_type", ["llama4_text", "dbrx"])
def test_hook_fallbacks(model_type: str, fused_calls: list[int]):
    """Llama 4 (the routing read from its router's output, E added to the block's) and DBRX (a plain experts
    module, E added by the forward hook)."""
    base = tiny_model(model_type)
    names = sorted(blocks_of(get_peft_model(copy.deepcopy(base), PerftConfig(variant="E", **ADAPTER))))
    selection = {names[0]: [0, 2]}
    selective, reference = selective_and_reference(base, selection)
    assert_selective_equals_restricted_full(selective, reference, selection)
    assert not fused_calls


def test_int8_experts(tmp_path: Path):
    """Experts quantized to int8 by torchao (their own eager implementation)."""
    from peft_perft.quantization import load_quantized_base

    build_tiny("olmoe", hidden_size=64, intermediate_size=32).save_pretrained(tmp_path)
    base = load_quantized_base(str(tmp_path), "int8-experts")
    selective, reference = selective_and_reference(base, SELECTION)
    assert_selective_equals_restricted_full(selective, reference, SELECTION)


def test_unselected_blocks_are_left_as_they_are():
    """A block with no selected expert is not wrapped; the selected ones store one row per chosen expert."""
    model = get_peft_model(build_tiny("olmoe"), PerftConfig(variant="E", target_experts={"model.layers.1.mlp": [0]}))
    assert list(blocks_of(model)) == ["model.layers.1.mlp"]
    assert not isinstance(model.base_model.model.model.layers[0].mlp, PerftMoeBlock)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 32 * 8  # one expert: A (8 x 32) and B (32 x 8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variant": "R", "target_experts": SELECTION}, "target_experts is set with variant='R'"),
        ({"variant": "E", "target_experts": {"model.layers.0.mlp": [-1]}}, "expert indices"),
        ({"variant": "E", "target_experts": {"model.layers.0.mlp": "0"}}, "expert indices"),
    ],
)
def test_config_refuses_what_cannot_be_selected(settings: dict, message: str):
    with pytest.raises(ValueError, match=message):
        PerftConfig(**settings)


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({"model.layers.0.mlp": [4]}, r"selects experts \[4\], but that block has 4 experts"),
        ({"model.layers.7.mlp": [0]}, r"names \['model.layers.7.mlp'\], which are not MoE blocks"),
        ({"layers.0.mlp": [0]}, "key target_experts by those module names"),
        ({"model.layers.0.mlp": []}, "selects no expert in any block"),
    ],
)
def test_injection_refuses_selections_the_model_does_not_have(selection: dict, message: str):
    with pytest.raises(ValueError, match=message):
        get_peft_model(build_tiny("olmoe"), PerftConfig(variant="E", target_experts=selection))


LOAD_IN_FRESH_PROCESS = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, tokens_path = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(tokens_path)).logits, tokens_path + ".out")
print(json.dumps({"target_experts": model.peft_config["default"].target_experts}))
"""


def test_saved_adapter_round_trips_and_plain_peft_loads_it(tmp_path: Path):
    """adapter_config.json records the selection (block names as JSON keys); the safetensors file holds one row per
    selected expert under the usual keys; PeftModel.from_pretrained in a fresh process gives the same logits."""
    base_dir, adapter_dir, tokens_path = tmp_path / "base", tmp_path / "adapter", tmp_path / "tokens.pt"
    build_tiny("olmoe").save_pretrained(base_dir)
    model = get_peft_model(
        build_tiny("olmoe"),
        PerftConfig(variant="E", init_weights=False, target_experts=SELECTION, target_experts_source="by hand"),
    ).eval()
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["target_experts"] == SELECTION and saved["target_experts_source"] == "by hand"
    shapes = {key: tuple(value.shape) for key, value in load_file(adapter_dir / "adapter_model.safetensors").items()}
    assert shapes == {
        "base_model.model.model.layers.0.mlp.perft_A": (2, 8, 32),
        "base_model.model.model.layers.0.mlp.perft_B": (2, 32, 8),
        "base_model.model.model.layers.1.mlp.perft_A": (1, 8, 32),
        "base_model.model.model.layers.1.mlp.perft_B": (1, 32, 8),
    }
    tokens = _input_ids()
    torch.save(tokens, tokens_path)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    command = [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(base_dir), str(adapter_dir), str(tokens_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"target_experts": SELECTION}
    # Another process may sum its GEMMs in another order on this CPU: equal to float32 rounding.
    torch.testing.assert_close(torch.load(str(tokens_path) + ".out"), expected, rtol=1e-5, atol=1e-6)
    reloaded = PeftModel.from_pretrained(build_tiny("olmoe"), adapter_dir)
    assert reloaded.peft_config["default"].target_experts == SELECTION


SELECTIVE_WORKER = Path(sharded_worker.__file__).with_name("selective_worker.py")
EP_SELECTIVE = {
    "variant": "E",
    "r": 4,
    "init_weights": False,
    "target_experts": {"model.layers.0.mlp": [0, 1, 3], "model.layers.1.mlp": [2]},
}
EP_ROWS = {
    0: {"model.layers.0.mlp": [0, 1], "model.layers.1.mlp": []},
    1: {"model.layers.0.mlp": [2], "model.layers.1.mlp": [0]},
}
"""Under ep_size=2 each rank holds the selected experts among its 2 local ones (rows of the whole adapter tensors):
unequal shares, and none of the second block's on rank 0."""


def launch_selective_ranks(*arguments: str) -> None:
    """Two gloo ranks running tests/distributed/selective_worker.py, with a hard timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*command, str(SELECTIVE_WORKER), *arguments], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def parameter_name(block: str, tensor_name: str) -> str:
    return f"base_model.model.{block}.{tensor_name}.default"


def one_process_reference(base_dir: Path) -> tuple[dict, torch.Tensor]:
    """The selective adapter in one process on the whole batch: initial values, logits, step-1 gradients, trained
    values, and the logits after training."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), PerftConfig(**EP_SELECTIVE))
    tokens = sharded_worker.batches()
    reference = {"initial": gathered_adapter_state_dict(model)}
    with torch.no_grad():
        reference["logits"] = model(input_ids=tokens[0]).logits
    reference.update(sharded_worker.train(model, "single", tokens))
    with torch.no_grad():
        trained_logits = model(input_ids=tokens[0]).logits
    reference["trained"] = gathered_adapter_state_dict(model)
    return reference, trained_logits


def assert_reproduces(run: dict, reference: dict, keys: tuple[str, ...] = ("initial", "trained")) -> None:
    torch.testing.assert_close(run["logits"], reference["logits"], rtol=1e-5, atol=1e-6)
    for key in keys:
        assert run[key].keys() == reference[key].keys()
        for name, tensor in reference[key].items():
            torch.testing.assert_close(run[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


@pytest.mark.parametrize("layout", ["fsdp_ep_sharded", "tp"])
def test_sharded_selective_e_reproduces_one_process(layout: str, tmp_path: Path):
    """Two gloo processes reproduce one process on the whole batch: logits, initial adapter (rank 0's), gradients,
    the trained adapter; the adapter they save loads in one process and sharded again to the same logits.

    Under ``ep_implementation="perft"`` (fsdp_size=2, ep_size=2) each rank holds only its local selected experts
    (unequal counts, reported) and gets those rows' gradients; under ``tp_size=2`` each rank holds half of every
    selected expert's bottleneck."""
    base_dir, output = tmp_path / "base", tmp_path / "run"
    build_tiny("olmoe").save_pretrained(base_dir)
    reference, trained_logits = one_process_reference(base_dir)
    launch_selective_ranks(layout, str(base_dir), str(output), json.dumps(EP_SELECTIVE))
    runs = [torch.load(f"{output}.rank{rank}") for rank in EP_ROWS]
    for name, tensor in runs[0]["reinitialised"].items():  # init_perft_weights gives every rank rank 0's values
        torch.testing.assert_close(runs[1]["reinitialised"][name], tensor, rtol=0, atol=0)
        assert not torch.equal(tensor, runs[0]["trained"][name])
    for rank, rows in EP_ROWS.items():
        run = runs[rank]
        sharded_over_ep = layout == "fsdp_ep_sharded"
        whole = ("initial", "trained") if sharded_over_ep else ("initial", "trained", "gradients")
        assert_reproduces(run, reference, whole)
        if not sharded_over_ep:
            assert run["balance"] == {} and run["warned"] == []
            for name, tensor in reference["initial"].items():
                assert run["held"][name] == tensor.numel() // 2  # half of r=4 per rank
            continue
        assert run["balance"] == {"model.layers.0.mlp": [2, 1], "model.layers.1.mlp": [0, 1]}
        assert len(run["warned"]) == 1  # once for the model, not once per block
        assert "in 2 of 2 MoE blocks (most uneven: 'model.layers.0.mlp', [2, 1] per rank" in run["warned"][0]
        for block, block_rows in rows.items():
            for tensor_name in ("perft_A", "perft_B"):
                name = parameter_name(block, tensor_name)
                assert run["held"][name] == len(block_rows) * 4 * 32  # r=4, hidden 32
                reinitialised = run["reinitialised"][name][block_rows]
                assert torch.equal(run["reinitialised_held"][name], reinitialised)
                if block_rows:
                    expected = reference["gradients"][name][block_rows]
                    torch.testing.assert_close(run["gradients"][name], expected, rtol=1e-5, atol=1e-6)

    adapter_dir = Path(f"{output}.adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        tokens = sharded_worker.batches()
        torch.testing.assert_close(reloaded(input_ids=tokens[0]).logits, trained_logits, rtol=1e-5, atol=1e-6)
    launch_selective_ranks(layout, str(base_dir), str(tmp_path / "loaded"), "{}", str(adapter_dir))
    for rank in EP_ROWS:
        loaded = torch.load(tmp_path / f"loaded.rank{rank}")
        torch.testing.assert_close(loaded["logits"], trained_logits, rtol=1e-5, atol=1e-6)


def test_prepared_on_meta_and_initialised_equals_the_real_device_adapter(tokens):
    """torch's meta-device recipe: the expert map, a buffer that ``to_empty`` leaves uninitialised, is rebuilt by
    ``init_perft_weights``; the adapter and logits are those of get_peft_model on a real device."""
    from test_meta_device import materialise_from_meta

    config = PerftConfig(variant="E", r=4, init_weights=False, target_experts=SELECTION)
    real_base = build_tiny()
    base_state = {key: tensor.clone() for key, tensor in real_base.state_dict().items()}
    torch.manual_seed(7)
    real = get_peft_model(real_base, config)
    deferred = materialise_from_meta(config, base_state)
    for block in blocks_of(deferred).values():
        block.perft_expert_slots["default"].fill_(-7)  # what to_empty may leave there
    torch.manual_seed(7)
    deferred.init_perft_weights()
    for name, block in blocks_of(deferred).items():
        assert torch.equal(block.perft_expert_slots["default"], blocks_of(real)[name].perft_expert_slots["default"])
    with torch.no_grad():
        torch.testing.assert_close(deferred(input_ids=tokens).logits, real(input_ids=tokens).logits, rtol=0, atol=0)


def test_beside_a_full_e_adapter_each_keeps_its_own_experts(tokens):
    """A selective and a full PERFT-E adapter on one model: each alone gives its own model's logits, and deleting
    the selective one removes its expert map with its tensors."""
    base = build_tiny()
    torch.manual_seed(3)
    full = get_peft_model(copy.deepcopy(base), PerftConfig(variant="E", init_weights=False))
    selective_alone = get_peft_model(
        copy.deepcopy(base), PerftConfig(variant="E", init_weights=False, target_experts=SELECTION)
    )
    both = copy.deepcopy(full)
    both.add_adapter("selected", PerftConfig(variant="E", init_weights=False, target_experts=SELECTION))
    both.load_state_dict(
        {k.replace(".default", ".selected"): v for k, v in selective_alone.state_dict().items() if ".perft_" in k},
        strict=False,
    )
    with torch.no_grad():
        for adapter, reference in (("default", full), ("selected", selective_alone)):
            both.set_adapter(adapter)
            torch.testing.assert_close(both(input_ids=tokens).logits, reference(input_ids=tokens).logits)
    both.delete_adapter("selected")
    assert all("selected" not in block.perft_expert_slots for block in blocks_of(both).values())
