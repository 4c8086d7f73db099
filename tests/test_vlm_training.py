"""A tiny image-text MoE model (Qwen3-VL-MoE) trains a PERFT adapter with TRL's SFTTrainer and reloads exactly.

The example script runs as its users run it (a fresh ``python examples/vlm_perft.py --tiny`` process); the test then
reloads its adapter here, onto a base model rebuilt independently, and checks the logits it wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "vlm_perft.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example_vlm_perft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("vlm")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(SCRIPT), "--tiny", "--output_dir", str(output_dir), "--max_steps", "12"]
    completed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir


def test_the_example_trains_on_images_and_text(trained_run: Path) -> None:
    """The loss falls, only the adapter was saved, and its up-projections moved from their zero start."""
    report = json.loads((trained_run / "report.json").read_text())
    assert report["last_loss"] < report["first_loss"]
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["variant"], config["num_experts"]) == ("PERFT", "R", 4)
    weights = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert weights and all(".perft_" in name for name in weights)
    up_projections = [tensor for name, tensor in weights.items() if "perft_B" in name]
    assert up_projections and all(tensor.abs().sum() > 0 for tensor in up_projections)


def test_the_adapter_reloads_exactly_onto_a_fresh_base(trained_run: Path) -> None:
    """Reloaded onto an independently rebuilt base, the adapter reproduces the trained model's logits on an
    image-text batch bit for bit, and those logits differ from the base model's."""
    example = load_example()
    saved = torch.load(trained_run / "check_batch.pt")
    batch = saved["batch"]
    assert (batch["input_ids"] == 3).any() and batch["pixel_values"].shape[0] > 0, "the batch must hold images"
    reloaded = PeftModel.from_pretrained(example.tiny_qwen3_vl_moe(seed=0), trained_run / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(**batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=0)
    assert not torch.allclose(logits, base_logits, atol=1e-4)
    assert json.loads((trained_run / "report.json").read_text())["reload_max_abs_diff"] == 0.0


def test_the_collator_masks_everything_but_the_answer() -> None:
    """Labels cover the answer and its end token; image placeholders match the processor's patch grid."""
    example = load_example()
    tokenizer = example.tiny_tokenizer()
    collator = example.ImageTextCollator(example.tiny_image_processor(), tokenizer, example.ImageTokens(3, 4, 5))
    rows = [example.colour_examples(2)[index] for index in range(2)]
    batch = collator(rows)
    for row, input_ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        answer = tokenizer.encode(row["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        prompt = [4, 3, 5] + tokenizer.encode(row["prompt"], add_special_tokens=False)  # start, one image, end
        assert input_ids[: len(prompt) + len(answer)].tolist() == prompt + answer
        assert labels[labels != -100].tolist() == answer
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert (batch["mm_token_type_ids"] == (batch["input_ids"] == 3)).all()


def test_evaluation_refuses_an_image_text_only_model_as_documented(tmp_path: Path) -> None:
    """docs/evaluation.md says that `peft-perft eval` loads causal LMs only: an image-text-only MoE checkpoint is
    refused by Transformers' causal-LM auto class, naming its config class, before anything is evaluated."""
    from peft_perft.evaluation import load_model

    example = load_example()
    example.tiny_qwen3_vl_moe().save_pretrained(tmp_path)
    example.tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unrecognized configuration class .*Qwen3VLMoeConfig"):
        load_model(str(tmp_path), device="cpu")
