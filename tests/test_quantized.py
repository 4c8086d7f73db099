"""PERFT on quantized frozen bases, on CPU: bitsandbytes NF4 and 8-bit, torchao int8 on the fused experts, quanto.

A tiny OLMoE is saved once and loaded quantized each time (as a user loads a Hub checkpoint). Each variant must
train with gradients on adapter tensors only and a falling loss, and its adapter, saved and loaded onto a freshly
quantized base, must give the same logits. TRL's SFTTrainer, peft's ``prepare_model_for_kbit_training`` with
gradient checkpointing, and peft's LoRA on the expert weights are tried on the same quantized models.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from test_architectures import _input_ids as input_ids
from test_architectures import _logits as logits
from test_architectures import _perft_config as perft_config
from test_architectures import _single_thread  # noqa: F401 (autouse fixture: one thread for the tiny models)
from transformers import AutoModelForCausalLM, QuantoConfig, TorchAoConfig
from trl import SFTConfig, SFTTrainer

from peft_perft import PerftConfig
from peft_perft.quantization import load_quantized_base

KINDS = ("bnb4", "bnb8", "int8-experts", "quanto")
VARIANTS = ("R", "E", "D", "S")
EXPERTS_WEIGHT = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OLMoE checkpoint with attention, router and experts large enough to quantize (hidden 64)."""
    directory = tmp_path_factory.mktemp("tiny-olmoe")
    build_tiny("olmoe", hidden_size=64, intermediate_size=32).save_pretrained(directory)
    return directory


def load(base_dir: Path, kind: str) -> torch.nn.Module:
    """The checkpoint quantized with ``kind``; quanto through Transformers' QuantoConfig (int8 weights)."""
    if kind == "quanto":
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QuantoConfig(weights="int8"))
    return load_quantized_base(str(base_dir), kind)


def test_each_quantizer_quantizes_what_the_docs_say(base_dir: Path):
    """bitsandbytes and quanto replace Linear layers and leave the fused experts; int8-experts does the opposite."""
    kinds = {kind: load(base_dir, kind) for kind in KINDS}
    q_proj = {kind: type(m.model.layers[0].self_attn.q_proj).__name__ for kind, m in kinds.items()}
    experts = {kind: type(m.get_parameter(EXPERTS_WEIGHT)).__name__ for kind, m in kinds.items()}
    assert q_proj == {"bnb4": "Linear4bit", "bnb8": "Linear8bitLt", "int8-experts": "Linear", "quanto": "QLinear"}
    assert experts == {"bnb4": "Parameter", "bnb8": "Parameter", "int8-experts": "Int8Tensor", "quanto": "Parameter"}
    assert kinds["int8-experts"].config._experts_implementation == "eager"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_variant_trains_and_reloads_exactly_on_quantized_base(base_dir: Path, kind: str, variant: str):
    """A plain training loop: only adapter tensors get gradients, the loss falls; the saved adapter on a freshly
    quantized base gives the same logits."""
    model = get_peft_model(load(base_dir, kind), perft_config(variant))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".perft_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = input_ids(), []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
        assert all(model.get_parameter(name).grad is not None for name in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    trained = logits(model, ids)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(load(base_dir, kind), directory)
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=0)


def sft_dataset() -> Dataset:
    return Dataset.from_dict({"input_ids": [list(range(3 + i, 19 + i)) for i in range(8)]})


def sft_args(directory: str) -> SFTConfig:
    return SFTConfig(
        output_dir=directory,
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
    )


@pytest.mark.parametrize("kind", ["bnb4", "bnb8", "int8-experts", "quanto"])
def test_sft_trainer_trains_perft_on_quantized_base(base_dir: Path, kind: str, tmp_path: Path):
    """TRL's SFTTrainer accepts every base loaded as peft_perft.quantization (or QuantoConfig) loads it."""
    model = get_peft_model(load(base_dir, kind), perft_config("E"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = experts_weight(model).detach().clone()
    trainer = SFTTrainer(model=model, args=sft_args(str(tmp_path)), train_dataset=sft_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)
    assert torch.equal(experts_weight(model).dequantize(), frozen.dequantize()), "the frozen experts must not move"


def experts_weight(model: torch.nn.Module) -> torch.Tensor:
    """The first layer's fused gate/up expert weight, wherever PERFT's wrapper put it."""
    return next(p for name, p in model.named_parameters() if name.endswith("experts.gate_up_proj"))


def test_trainer_refuses_torchao_config_models_so_int8_experts_quantizes_after_loading(base_dir: Path, tmp_path):
    """Transformers' Trainer reads the bit width from the torchao config's class name, so a model loaded with
    TorchAoConfig(FqnToConfig(...)) counts as not trainable; peft_perft quantizes with torchao after loading."""
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig

    config = TorchAoConfig(FqnToConfig({"re:.*experts\\.(gate_up_proj|down_proj)": Int8WeightOnlyConfig()}))
    loaded = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, experts_implementation="eager")
    model = get_peft_model(loaded, perft_config("S"))
    with pytest.raises(ValueError, match="TORCHAO but that quantization method do not support training"):
        SFTTrainer(model=model, args=sft_args(str(tmp_path)), train_dataset=sft_dataset())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = input_ids(), []
    for _ in range(4):  # the plain loop of docs/quantized.md trains it
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def adapter_gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["R", "E"])
def test_prepare_model_for_kbit_training_with_gradient_checkpointing(base_dir: Path, variant: str):
    """peft's k-bit preparation with gradient checkpointing gives the adapter the gradients of a plain run."""
    torch.manual_seed(0)
    plain = get_peft_model(load(base_dir, "bnb4"), perft_config(variant))
    prepared_base = prepare_model_for_kbit_training(load(base_dir, "bnb4"), use_gradient_checkpointing=True)
    assert prepared_base.is_gradient_checkpointing
    torch.manual_seed(0)
    prepared = get_peft_model(prepared_base, perft_config(variant))
    ids = input_ids()
    expected, checkpointed = adapter_gradients(plain, ids), adapter_gradients(prepared, ids)
    assert expected.keys() == checkpointed.keys() and expected
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-6)


def test_lora_on_the_expert_weights_fails_where_perft_trains(base_dir: Path):
    """peft's LoRA on the fused expert weights (target_parameters) runs baddbmm on torchao's int8 tensor, which
    has no such op: NotImplementedError. PERFT-E on the same quantized model trains (tests above)."""
    lora = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(load(base_dir, "int8-experts"), lora)
    ids = input_ids()
    with pytest.raises(NotImplementedError, match="Int8Tensor dispatch.*baddbmm"):
        model(input_ids=ids, labels=ids)


def test_demo_quantize_flag_loads_the_base_quantized_and_its_reload_check_is_exact(base_dir: Path):
    """``peft-perft demo --quantize`` reaches load_base_model, and the demo's reload check rebuilds the same
    quantized base (an unquantized one would not reproduce the logits)."""
    from peft_perft.cli import build_parser
    from peft_perft.demo.scoring import check_reload
    from peft_perft.workflow import load_base_model

    assert build_parser("demo").parse_args(["demo", "--quantize", "int8-experts"]).quantize == "int8-experts"
    with pytest.raises(SystemExit):
        build_parser("demo").parse_args(["demo", "--quantize", "int4"])
    cpu = torch.device("cpu")
    model = get_peft_model(load_base_model(str(base_dir), cpu, "bnb4"), PerftConfig(variant="E", init_weights=False))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    test = Dataset.from_dict({"prompt": ["ABC", "DE"], "completion": ["FG", "H"]})
    tokenizer = _byte_tokenizer()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        assert check_reload(model.eval(), str(base_dir), Path(directory), tokenizer, test, cpu, "bnb4")["passed"]
        assert not check_reload(model, str(base_dir), Path(directory), tokenizer, test, cpu, None)["passed"]


def _byte_tokenizer():
    from conftest import char_tokenizer

    return char_tokenizer("".join(chr(c) for c in range(33, 91)))  # 58 characters: ids 3..60 of the 64


def test_pilot_quantize_flag_trains_on_the_quantized_base(base_dir: Path, tmp_path: Path, monkeypatch):
    """``peft-perft pilot --quantize int8-experts`` prices the run on a base whose experts are int8."""
    import json

    from peft_perft.cli import main
    from peft_perft.pilot import run as pilot_run

    model_dir = tmp_path / "model"
    build_tiny("olmoe", hidden_size=64, intermediate_size=32).save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    loaded = []
    original = pilot_run.load_base_model
    monkeypatch.setattr(pilot_run, "load_base_model", lambda *a: loaded.append(original(*a)) or loaded[-1])
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{chr(33 + i % 40)}{chr(34 + i % 40)}", "completion": f"{chr(35 + i % 40)}"} for i in range(60)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["pilot", "--model", str(model_dir), "--dataset", str(data), "--configs", "E", "--max-steps", "4"]
    argv += ["--batch-size", "4", "--train-samples", "16", "--eval-samples", "8", "--quantize", "int8-experts"]
    assert main([*argv, "--output-dir", str(tmp_path / "pilot")]) == 0
    report = json.loads((tmp_path / "pilot" / "pilot.json").read_text())
    assert report["settings"]["quantize"] == "int8-experts"
    assert [result["name"] for result in report["results"]] == ["PERFT-E"]
    assert all(result["steps"] == 4 for result in report["results"])
    assert len(loaded) == 1 and all(type(experts_weight(m)).__name__ == "Int8Tensor" for m in loaded)
