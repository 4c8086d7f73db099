"""Bad input fails loudly and early; nothing is half-loaded; no pickle is read unless allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_perft import PerftConfig, loading
from peft_perft.loading import ALLOW_PICKLE_ENV, AdapterMismatchError, DamagedAdapterError


def saved_adapter(tmp_path: Path, variant: str = "R", **overrides) -> Path:
    settings = {"r": 4, "init_weights": False, **({"num_experts": 3} if variant in "RD" else {})}
    model = get_peft_model(build_tiny(**overrides), PerftConfig(variant=variant, **settings))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    ("base_overrides", "expected_in_message"),
    [
        ({"hidden_size": 48}, "the model expects shape (3, 4, 48), the adapter has (3, 4, 32)"),
        ({"num_hidden_layers": 3}, "layers.2.mlp.perft_A.default: missing from the adapter"),
        ({"num_hidden_layers": 1}, "layers.1.mlp.perft_A: in the adapter but the model has no such MoE block"),
    ],
)
def test_adapter_for_another_base_is_refused_naming_the_layer(
    tmp_path: Path, base_overrides: dict, expected_in_message: str
) -> None:
    adapter = saved_adapter(tmp_path)
    with pytest.raises(AdapterMismatchError) as error:
        PeftModel.from_pretrained(build_tiny(**base_overrides), adapter)
    assert expected_in_message in str(error.value)
    assert "nothing was loaded" in str(error.value)


def test_perft_e_adapter_for_another_expert_count_is_refused(tmp_path: Path) -> None:
    adapter = saved_adapter(tmp_path, variant="E")
    with pytest.raises(AdapterMismatchError, match=r"expects shape \(8, 4, 32\), the adapter has \(4, 4, 32\)"):
        PeftModel.from_pretrained(build_tiny(num_experts=8), adapter)


def test_a_refused_adapter_leaves_an_existing_model_untouched(tmp_path: Path, tokens) -> None:
    good = saved_adapter(tmp_path / "good")
    model = PeftModel.from_pretrained(build_tiny(), good)
    expected = model(tokens).logits
    tensors = load_file(good / "adapter_model.safetensors")
    wrong = {key: value[:2] if key.endswith("layers.1.mlp.perft_A") else value for key, value in tensors.items()}
    wrong = {key: torch.full_like(value, 7.0) if "layers.0" in key else value for key, value in wrong.items()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file(wrong, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError):
        model.load_adapter(broken, adapter_name="default")
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)


def test_missing_weights_file_is_reported(tmp_path: Path) -> None:
    adapter = saved_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors: the save did not finish"):
        PeftModel.from_pretrained(build_tiny(), adapter)


def test_truncated_weights_file_is_reported(tmp_path: Path) -> None:
    adapter = saved_adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedAdapterError, match="truncated or corrupt") as raised:
        PeftModel.from_pretrained(build_tiny(), adapter)
    assert str(raised.value).startswith(f"{weights} is damaged (")


def test_corrupt_or_missing_config_is_reported(tmp_path: Path) -> None:
    adapter = saved_adapter(tmp_path)
    (adapter / "adapter_config.json").write_text('{"peft_type": "PERFT", "variant": ')
    for load in (lambda: PeftModel.from_pretrained(build_tiny(), adapter), lambda: PeftConfig.from_pretrained(adapter)):
        with pytest.raises(DamagedAdapterError) as raised:
            load()
        assert str(raised.value).startswith(f"{adapter / 'adapter_config.json'} is not valid JSON (")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(build_tiny(), adapter)


def test_config_from_a_newer_version_loads_with_a_warning(tmp_path: Path, tokens) -> None:
    adapter = saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["field_from_the_future"] = 3
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="field_from_the_future"):
        model = PeftModel.from_pretrained(build_tiny(), adapter)
    assert model.peft_config["default"].variant == "R"


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path, monkeypatch, tokens) -> None:
    adapter = saved_adapter(tmp_path)
    expected = PeftModel.from_pretrained(build_tiny(), adapter)(tokens).logits
    tensors = load_file(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(PermissionError, match="pickle file; PERFT loads adapters from safetensors only"):
        PeftModel.from_pretrained(build_tiny(), adapter)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    loaded = PeftModel.from_pretrained(build_tiny(), adapter)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)


def test_target_modules_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="(?i)target modules.*not found|no module"):
        get_peft_model(build_tiny(), PerftConfig(target_modules=["does_not_exist"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["R", "E", "D", "S"])
def test_save_and_reload_are_exact_for_every_dtype(tmp_path: Path, tokens, dtype: torch.dtype, variant: str) -> None:
    model = get_peft_model(build_tiny().to(dtype), PerftConfig(variant=variant, r=4, init_weights=False))
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if ".perft_" in name)
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny().to(dtype), tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)


def test_fixed_seed_gives_identical_training(tokens) -> None:
    def train() -> torch.Tensor:
        torch.manual_seed(123)
        model = get_peft_model(build_tiny(), PerftConfig(variant="R", r=4, num_experts=4, lora_dropout=0.1))
        model.train()
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(tokens, labels=tokens, output_router_logits=True).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    assert torch.equal(train(), train())


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, tokens) -> None:
    model = get_peft_model(build_tiny(), PerftConfig(variant="S", r=4, init_weights=False))
    model.save_pretrained(tmp_path)
    expected = model(tokens).logits
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if ".perft_B" in name).add_(1.0)

    def disk_full(tensors: dict, filename: str, metadata: dict | None) -> None:
        Path(filename).write_bytes(b"\x00" * 64)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "_write_tensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.partial")), "no half-written file may remain"
    reloaded = PeftModel.from_pretrained(build_tiny(), tmp_path)
    torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=0)
