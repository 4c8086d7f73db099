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
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "vlm_perft.py"
FIXTURES = REPO / "tests" / "fixtures" / "llm_adapters"


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


def test_the_adapter_reloads_onto_a_fresh_base(trained_run: Path) -> None:
    """Reloaded onto an independently rebuilt base, the adapter holds the saved tensors bit for bit and reproduces
    the trained model's logits on an image-text batch (to float32 rounding: the run was another process, whose
    GEMMs may sum in another order on this CPU; within the run the reload is bit for bit, as its report says), and
    those logits differ from the base's."""
    example = load_example()
    saved = torch.load(trained_run / "check_batch.pt")
    batch = saved["batch"]
    assert (batch["input_ids"] == 3).any() and batch["pixel_values"].shape[0] > 0, "the batch must hold images"
    reloaded = PeftModel.from_pretrained(example.tiny_qwen3_vl_moe(seed=0), trained_run / "adapter").eval()
    saved_tensors = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    loaded_tensors = get_peft_model_state_dict(reloaded)
    assert loaded_tensors.keys() == saved_tensors.keys() and saved_tensors
    assert all(torch.equal(loaded_tensors[name], tensor) for name, tensor in saved_tensors.items())
    with torch.no_grad():
        logits = reloaded(**batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-6)
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


def test_evaluation_scores_an_image_text_only_model_on_text(tmp_path: Path) -> None:
    """`peft-perft eval` loads an image-text-only MoE checkpoint (no causal-LM class in Transformers) through its
    image-text-to-text class and generates from the text prompt alone: the answer it scores is the greedy
    continuation computed here token by token from the model's own logits."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from peft_perft.evaluation import GenerationSettings, evaluate, load_model

    example = load_example()
    tiny = example.tiny_qwen3_vl_moe()
    tiny.config.text_config.max_position_embeddings = 2048  # the character-level prompts are long
    tiny.save_pretrained(tmp_path)
    tokenizer = example.tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert isinstance(model, Qwen3VLMoeForConditionalGeneration)
    settings = GenerationSettings(batch_size=1, max_new_tokens=6)
    report = evaluate(model, loaded_tokenizer, FIXTURES, ["SingleEq"], settings, max_samples=1)
    prediction = report.results["SingleEq"].predictions[0]
    tokens = tokenizer(prediction.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            following = model(input_ids=tokens).logits[0, -1].argmax()
            if following.item() == tokenizer.eos_token_id:
                break
            tokens = torch.cat([tokens, following.view(1, 1)], dim=1)
    prompt_length = len(tokenizer(prediction.prompt)["input_ids"])
    assert prediction.generated_text, "a continuation to compare"
    assert prediction.generated_text == tokenizer.decode(tokens[0, prompt_length:], skip_special_tokens=True)


def test_evaluation_and_pilot_refuse_what_they_cannot_run_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An encoder-decoder MoE model is refused by the evaluation with a message naming its type and why; the pilot
    (text training through the causal-LM class) refuses an image-text-only one on the command line, saying what
    trains it, before building any model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Qwen3MoeConfig, SwitchTransformersConfig

    from peft_perft.cli import main
    from peft_perft.evaluation.runner import text_generation_class

    example = load_example()
    assert text_generation_class(example.tiny_qwen3_vl_moe().config, "vl") is AutoModelForImageTextToText
    assert text_generation_class(Qwen3MoeConfig(), "causal") is AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"'switch_transformers' model .*encoder-decoder MoE models .*not evaluated"):
        text_generation_class(SwitchTransformersConfig(), "switch")

    example.tiny_qwen3_vl_moe().save_pretrained(tmp_path / "vl")
    example.tiny_tokenizer().save_pretrained(tmp_path / "vl")
    status = main(["pilot", "--model", str(tmp_path / "vl"), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "out").exists()
    assert "'qwen3_vl_moe' model" in error and "no causal-LM class" in error and "examples/vlm_perft.py" in error
