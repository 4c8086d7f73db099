"""`peft-perft pilot`: budget matching, measurements and the recommendation, end to end on a tiny OLMoE."""

from __future__ import annotations

import json
import math
import string
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import SPECIAL_TOKENS, build_tiny, char_tokenizer, tiny_olmoe_config
from datasets import Dataset
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from peft_perft.cli import main
from peft_perft.pilot import CandidateResult, PilotReport, PilotSettings, recommend
from peft_perft.pilot.measure import held_out_losses, token_weighted
from peft_perft.pilot.run import (
    attention_projection_names,
    match_budget,
    parse_config_keys,
    perft_config,
    validate_settings,
)

FIXTURES = Path(__file__).parent / "fixtures" / "llm_adapters"
CHARACTERS = string.ascii_letters + string.digits + " :=>-?.,'\n"
HIDDEN, LAYERS = 32, 2


def examples(count: int) -> list[dict[str, str]]:
    """Learnable prompt/completion pairs of one length: reverse a three-letter word."""
    words = [f"{a}{b}{c}" for a in "abcdefg" for b in "aeiou" for c in "xyz"]
    return [{"prompt": f"rev {word} =>", "completion": f" {word[::-1]}"} for word in words[:count]]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-olmoe")
    build_tiny(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS)).save_pretrained(directory)
    char_tokenizer(CHARACTERS).save_pretrained(directory)
    return directory


def perft_parameters(variant: str, r: int) -> int:
    """Per MoE block: N experts of A (r x D) and B (D x r), plus R's router (N x D); the tiny model has 4 experts."""
    experts = {"R": 8, "E": 4, "D": 2, "S": 1}[variant]
    return LAYERS * (experts * 2 * r * HIDDEN + (experts * HIDDEN if variant == "R" else 0))


def lora_parameters(r: int) -> int:
    """LoRA on q, k, v, o (all D x D in the tiny model): r (D_in + D_out) each, per layer."""
    return LAYERS * 4 * r * (HIDDEN + HIDDEN)


def test_pilot_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "train.jsonl"
    rows = examples(100)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "pilot"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main(
            ["pilot", "--model", str(tiny_model_dir), "--dataset", str(data), "--configs", "S,lora"]
            + ["--max-steps", "6", "--batch-size", "8", "--train-samples", "48", "--eval-samples", "16"]
            + ["--test-files", str(FIXTURES / "boolq"), "--test-samples", "2"]  # a task folder, as the README has it
            + ["--epochs", "2", "--learning-rate", "0.01", "--output-dir", str(output)]
        )

    assert status == 0
    # The pilot sets Transformers' current field name, so the deprecated alias's warning never reaches the user.
    assert not [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]
    report = json.loads((output / "pilot.json").read_text())
    results = {result["name"]: result for result in report["results"]}
    assert list(results) == ["PERFT-S", "LoRA-attn"]
    # Budget: PERFT-R at r = 8; each configuration gets the rank whose size is closest to it.
    assert report["budget"] == perft_parameters("R", 8)
    for name, size in (("PERFT-S", lambda r: perft_parameters("S", r)), ("LoRA-attn", lora_parameters)):
        rank = results[name]["rank"]
        assert results[name]["trainable_parameters"] == size(rank)
        assert all(abs(size(rank) - report["budget"]) <= abs(size(other) - report["budget"]) for other in range(1, 99))
    held_out = 16  # load_user_splits holds min(eval_samples, rows // 5) records out
    assert report["full_examples"] == len(rows) - held_out
    # Every example has the same length; TRL's tokens are its characters plus the eos.
    tokens_per_example = len(rows[0]["prompt"]) + len(rows[0]["completion"]) + 1
    assert {len(row["prompt"]) + len(row["completion"]) + 1 for row in rows} == {tokens_per_example}
    for result in results.values():
        assert result["steps"] == 6 and len(result["step_seconds"]) == 6 - 3
        assert result["tokens_per_second"] > 0 and result["peak_memory_mib"] > 0
        assert result["tokens_per_example"] == tokens_per_example
        assert len(result["eval_example_losses"]) == held_out
        assert result["eval_loss"] < math.log(len(SPECIAL_TOKENS) + len(CHARACTERS))  # it learned something
        assert result["accuracy_examples"] == 2 and set(result["accuracy_by_task"]) == {"boolq"}
        estimate = result["full_run"]
        assert estimate["examples"] == report["full_examples"] * 2
        expected_seconds = estimate["examples"] * result["tokens_per_example"] / result["tokens_per_second"]
        assert estimate["seconds"] == pytest.approx(expected_seconds)
    plot = matplotlib.image.imread(output / "pilot.png")
    assert plot.shape[0] > 400 and plot.shape[1] > 1000
    printed = capsys.readouterr().out
    assert "config" in printed and "PERFT-S" in printed and "LoRA-attn" in printed
    for line in ("lowest eval loss:", "fastest step:", "best accuracy:", "Full run of"):
        assert line in printed and any(line in entry for entry in report["recommendation"])


def test_ranks_bring_every_configuration_closest_to_the_budget() -> None:
    config = tiny_olmoe_config()
    targets = ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert attention_projection_names(config) == targets
    sizes = {
        "R": lambda r: perft_parameters("R", r),
        "E": lambda r: perft_parameters("E", r),
        "D": lambda r: perft_parameters("D", r),
        "S": lambda r: perft_parameters("S", r),
        "lora": lora_parameters,
    }
    for budget in (perft_parameters("R", 8), 5_000, 100):
        for key, size in sizes.items():
            candidate = match_budget(config, key, budget, targets)
            best = min(range(1, 200), key=lambda r, size=size, budget=budget: abs(size(r) - budget))
            assert (candidate.rank, candidate.trainable_parameters) == (best, size(best)), (key, budget)


def test_held_out_loss_is_the_models_own_completion_loss() -> None:
    """Against the model's loss on the same tokens with the prompt masked, computed as one batch."""
    tokenizer = char_tokenizer(CHARACTERS)
    rows = examples(6)
    model = get_peft_model(build_tiny(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS)), perft_config("S", 2))
    args = SFTConfig(output_dir="unused", per_device_eval_batch_size=4, use_cpu=True, report_to="none")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )

    per_example = held_out_losses(trainer)

    total_loss, total_tokens = 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"]).input_ids
        full = prompt + tokenizer(row["completion"]).input_ids + [tokenizer.eos_token_id]
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt) :]])
        with torch.no_grad():
            # Router logits off: TRL turned the MoE load-balancing term on, and it is not part of the held-out loss.
            loss = model(input_ids=torch.tensor([full]), labels=labels, output_router_logits=False).loss.item()
        total_loss += loss * (len(full) - len(prompt))
        total_tokens += len(full) - len(prompt)
    assert [count for _, count in per_example] == [len(row["completion"]) + 1 for row in rows]
    assert token_weighted(per_example) == pytest.approx(total_loss / total_tokens, rel=1e-5)


def result(name: str, losses: list[float], step_seconds: list[float], **extra) -> CandidateResult:
    values = {
        "name": name,
        "rank": 4,
        "trainable_parameters": 1000,
        "steps": 10,
        "step_seconds": step_seconds,
        "tokens_per_second": 100.0,
        "tokens_per_example": 20.0,
        "peak_memory_mib": 500.0,
        "train_loss": 1.0,
        "eval_loss": sum(losses) / len(losses),
        "eval_loss_se": 0.01,
        "eval_example_losses": losses,
    }
    values.update(extra)
    return CandidateResult(**values)


def pilot_report(*results: CandidateResult) -> PilotReport:
    settings = PilotSettings(max_steps=10, epochs=2, batch_size=4)
    return PilotReport(settings, {"device": "cpu"}, 1000, list(results), "test data", full_examples=500)


def test_recommendation_separates_clear_wins_from_noise() -> None:
    clear = pilot_report(
        result("PERFT-R", [1.0, 1.1, 0.9, 1.0], [0.10, 0.11, 0.10]),
        result("LoRA-attn", [1.5, 1.6, 1.4, 1.5], [0.20, 0.21, 0.20], trainable_parameters=1100),
    )
    lines = recommend(clear)
    assert "lowest eval loss: PERFT-R (1.0000) vs LoRA-attn (1.5000)" in lines[1] and "clear" in lines[1]
    assert "fastest step:     PERFT-R (100 ms) vs LoRA-attn (200 ms): 50% faster" in lines[2] and "clear" in lines[2]
    assert "fewest parameters: PERFT-R (1,000; the grid spans 10% above it" in lines[3]
    # 500 examples x 2 epochs x 20 tokens at 100 tokens/s: 200 s.
    assert "1,000 examples" in lines[-1] and "= 3 min" in lines[-1] and "250 steps of 4" in lines[-1]

    noisy = pilot_report(
        result("PERFT-R", [1.0, 1.4, 0.6, 1.0], [0.10, 0.30, 0.10]),
        result("PERFT-E", [1.1, 1.0, 0.9, 1.1], [0.12, 0.10, 0.30]),
    )
    lines = recommend(noisy)
    assert "within noise" in lines[1] and "within timing noise" in lines[2]


def test_speed_is_not_judged_on_a_busy_cpu() -> None:
    fast, slow = result("PERFT-R", [1.0, 1.1], [0.10, 0.10, 0.11]), result("PERFT-S", [1.0, 1.2], [0.3, 0.3, 0.31])
    quiet = pilot_report(fast, slow)
    quiet.environment["cpu_cores"] = 2
    fast.busiest_load, slow.busiest_load = 1.5, 1.9
    assert "clear" in recommend(quiet)[2]

    slow.busiest_load = 5.4
    lines = recommend(quiet)
    assert "not trustworthy: other processes were using the CPU (load average up to 5.4 on 2 cores)" in lines[2]
    assert "while the CPU was shared" in lines[-1]


def test_recommendation_notes_equivalent_configurations_and_accuracy() -> None:
    same = [1.0, 1.2, 0.8]
    report = pilot_report(
        result("PERFT-D", same, [0.1, 0.1], accuracy=0.50, accuracy_examples=40),
        result("PERFT-S", same, [0.1, 0.1], accuracy=0.50, accuracy_examples=40),
        result("LoRA-attn", [1.4, 1.5, 1.6], [0.1, 0.1], accuracy=0.25, accuracy_examples=40),
    )
    lines = recommend(report)
    assert any("PERFT-D and PERFT-S measured identical held-out losses" in line for line in lines)
    accuracy = next(line for line in lines if "best accuracy" in line)
    assert "PERFT-D 50.0% vs PERFT-S 50.0% on 40 examples" in accuracy and "a tie" in accuracy


def test_a_tie_is_never_a_win_and_coinciding_values_get_a_readable_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = pilot_report(
        result("PERFT-R", [1.0, 1.1], [0.1, 0.1, 0.1], accuracy=0.0, accuracy_examples=50),
        result("PERFT-E", [1.0, 1.1], [0.1, 0.1, 0.1], accuracy=0.0, accuracy_examples=50),
    )
    lines = recommend(report)
    for axis_line in (lines[1], lines[2], next(line for line in lines if "best accuracy" in line)):
        assert "a tie: no difference measured" in axis_line and "clear" not in axis_line

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.write(tmp_path)
    accuracy_axes = [axis for axis in figures[0].axes if axis.get_ylabel().startswith("accuracy")]
    loss_axes = [axis for axis in figures[0].axes if axis.get_ylabel().startswith("eval loss")]
    assert accuracy_axes and all(axis.get_ylim() == (-2.0, 8.0) for axis in accuracy_axes)
    for axis in loss_axes:  # both losses are 1.05: the axis spans +-5% of it, not matplotlib's +-0.04 of zero
        assert axis.get_ylim() == pytest.approx((1.05 * 0.95, 1.05 * 1.05))


def test_bad_settings_are_refused_before_training() -> None:
    assert parse_config_keys("r, E,LORA,r") == ["R", "E", "lora"]
    with pytest.raises(ValueError, match="Unknown configuration 'X'"):
        parse_config_keys("R,X")
    with pytest.raises(ValueError, match="leaves no timed step"):
        validate_settings(PilotSettings(model=".", max_steps=3))
    with pytest.raises(ValueError, match="--eval-samples must be at least 1"):
        validate_settings(PilotSettings(model=".", eval_samples=0))
