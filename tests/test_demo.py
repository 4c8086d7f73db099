"""``peft-perft demo`` end to end on the bundled model, and its data-set loading on user files."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peft_perft import workflow
from peft_perft.cli import main
from peft_perft.demo import report as demo_report
from peft_perft.demo import run as demo
from peft_perft.demo import settings as demo_settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 12
EVAL_SAMPLES = 24


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short demo run shared by the end-to-end checks (the default run is the same with more steps)."""
    output_dir = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--steps", str(STEPS), "--batch-size", "16", "--max-eval-samples", str(EVAL_SAMPLES)]
    threads_before = torch.get_num_threads()
    exit_status = main([*argv, "--output-dir", str(output_dir)])
    assert torch.get_num_threads() == threads_before, "the demo must restore torch's thread setting"
    report = json.loads((output_dir / demo.REPORT_FILE_NAME).read_text())
    return exit_status, report, output_dir


def test_demo_exits_cleanly_and_writes_a_complete_report(demo_run, capsys):
    exit_status, report, output_dir = demo_run
    assert exit_status == 0
    expected_fields = {
        "accuracy_before",
        "accuracy_after",
        "trainable_parameters",
        "total_parameters",
        "trainable_share",
        "wall_seconds",
        "train_seconds",
        "peak_memory_mb",
        "adapter_dir",
        "heatmaps",
        "reload_check",
    }
    assert expected_fields <= set(report)
    assert report["steps"] == STEPS and report["test_examples"] == EVAL_SAMPLES
    assert all(path.startswith(str(output_dir.resolve())) for path in [report["adapter_dir"], *report["heatmaps"]])
    assert [path.name for path in output_dir.parent.iterdir() if path.name.startswith(f".{output_dir.name}.")] == []


def test_the_report_records_the_seed_and_a_command_that_repeats_the_run(demo_run):
    """The recorded command, parsed by the demo's own parser, gives back every setting of the run."""
    _, report, output_dir = demo_run
    assert report["seed"] == 0
    words = shlex.split(report["command"])
    assert words[:2] == ["peft-perft", "demo"]
    parser = argparse.ArgumentParser()
    demo_settings.add_cli_arguments(parser)
    recorded = vars(parser.parse_args(words[2:]))
    assert recorded["steps"] == STEPS and recorded["batch_size"] == 16 and recorded["seed"] == 0
    assert recorded["output_dir"] == output_dir and recorded["variant"] == "R"
    for accuracies in (report["accuracy_before"], report["accuracy_after"]):
        assert set(accuracies) == {"all", "lower", "nines", "shout", "next"}
        assert all(0.0 <= value <= 1.0 for value in accuracies.values())
    assert report["peak_memory_mb"] > 0 and 0 < report["train_seconds"] <= report["wall_seconds"]


def test_trainable_parameters_are_exactly_the_perft_r_experts_and_routers(demo_run):
    _, report, _ = demo_run
    base = AutoConfig.from_pretrained(workflow.BUNDLED_MODEL_DIR)
    num_experts, rank, hidden = 8, 8, base.hidden_size  # PERFT-R defaults: 8 experts of rank 8
    per_layer = num_experts * rank * hidden * 2 + num_experts * hidden  # A and B of every expert, plus the router
    assert report["trainable_parameters"] == base.num_hidden_layers * per_layer
    base_parameters = AutoModelForCausalLM.from_pretrained(workflow.BUNDLED_MODEL_DIR).num_parameters()
    assert report["total_parameters"] == base_parameters + report["trainable_parameters"]
    assert report["trainable_share"] == pytest.approx(report["trainable_parameters"] / report["total_parameters"])


def test_saved_adapter_reloads_and_reproduces_the_reported_accuracy(demo_run):
    _, report, output_dir = demo_run
    adapter_dir = output_dir / demo.ADAPTER_DIR_NAME
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert report["reload_check"]["passed"] and report["reload_check"]["max_abs_diff"] == 0.0

    # Score the held-out split again, independently: a fresh base, the saved adapter, plain greedy generate.
    base = AutoModelForCausalLM.from_pretrained(workflow.BUNDLED_MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, padding_side="left")
    test = workflow.bundled_task(num_train=0, max_eval_samples=EVAL_SAMPLES, seed=0).test
    batch = tokenizer(list(test["prompt"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(answer == expected for answer, expected in zip(answers, test["completion"], strict=True))
    assert report["accuracy_after"]["all"] == pytest.approx(correct / len(test))


def test_heatmaps_are_png_files(demo_run):
    _, report, output_dir = demo_run
    paths = [output_dir / "routing_by_task.png", output_dir / "routing" / "routing_perft.png"]
    assert {str(path) for path in paths} <= set(report["heatmaps"])
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_printed_report_names_accuracy_and_paths(demo_run):
    _, report, _ = demo_run
    text = demo_report.format_report(report)
    assert "logits match" in text and report["adapter_dir"] in text
    assert f"{report['accuracy_after']['all']:7.1%}" in text


def test_user_json_in_llm_adapters_format_gets_a_disjoint_held_out_split(tmp_path):
    records = [
        {"instruction": f"What is {a} plus {a}?", "input": "", "output": f"{a} plus {a} is {2 * a}.", "answer": 2 * a}
        for a in range(50)
    ]
    path = tmp_path / "math.json"
    path.write_text(json.dumps(records))
    splits = workflow.load_user_splits(str(path), max_eval_samples=8, seed=0)
    assert len(splits["test"]) == 8 and len(splits["train"]) == 42
    assert set(splits["test"]["prompt"]).isdisjoint(splits["train"]["prompt"])
    row = splits["test"][0]
    assert row["prompt"].endswith("### Response:\n") and "### Instruction:\nWhat is" in row["prompt"]
    assert row["completion"].endswith(f"is {row['answer']}.")
    scorer = workflow.answer_rule_scorer("gsm8k")
    assert scorer(f"so the total is {row['answer']}", row)
    assert not scorer("so the total is -1", row)


def test_user_prompt_completion_records_and_a_clear_error_for_others(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) for i in range(20)))
    splits = workflow.load_user_splits(str(path), max_eval_samples=4, seed=1)
    assert len(splits["test"]) == 4
    assert all(row["answer"] == row["completion"] for row in splits["test"])
    assert workflow.exact_match_scorer(" a3 ", {"completion": "a3", "answer": "a3"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "x", "reply": "y"}] * 10))
    with pytest.raises(ValueError, match="expected prompt/completion"):
        workflow.load_user_splits(str(bad), max_eval_samples=2, seed=0)
