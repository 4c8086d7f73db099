"""Tests of the LLM-Adapters evaluation protocol: answer rules, prompts, data loading, generation and the CLI.

End-to-end runs use a real tiny OLMoE whose weights are set so that it always generates one chosen word; its accuracy
on the fixture files then equals a count of the fixtures' gold answers done by hand (stated next to each case).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from peft_perft.cli import main
from peft_perft.evaluation import (
    TASKS,
    GenerationSettings,
    build_prompt,
    evaluate,
    evaluate_task,
    extract_answer,
    is_correct,
    load_model,
    load_task_records,
    resolve_tasks,
)
from peft_perft.evaluation.data import load_hub_records, load_json_records

FIXTURES = Path(__file__).parent / "fixtures" / "llm_adapters"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
ANSWER_WORDS = [
    *("true", "false", "solution1", "solution2", "answer1", "answer2", "answer3", "answer4", "answer5"),
    *("option1", "option2", "ending1", "ending2", "ending3", "ending4", "(C)", "3", "5", "8", "576", "0.667"),
]
PROMPT_WORDS = ["Below", "is", "an", "instruction", "that", "describes", "a", "task.", "###", "Response:", "the"]
VOCAB = {word: index for index, word in enumerate(dict.fromkeys(SPECIAL_TOKENS + ANSWER_WORDS + PROMPT_WORDS))}
HIDDEN_SIZE = 32


# ---------------------------------------------------------------- tiny real model and tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: every answer word is one token, unknown prompt words map to [UNK]."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def make_model(seed: int = 0) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    config = OlmoeConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        pad_token_id=VOCAB["[PAD]"],
        eos_token_id=VOCAB["[EOS]"],
        bos_token_id=None,
    )
    return OlmoeForCausalLM(config).eval()


@torch.no_grad()
def make_constant_model(word: str) -> OlmoeForCausalLM:
    """A real OLMoE whose decoder layers add nothing, every token embeds to e0, and only `word`'s logit is nonzero:
    greedy and beam search then generate `word` at every step."""
    model = make_model()
    for parameter in model.model.layers.parameters():
        parameter.zero_()
    direction = torch.zeros(HIDDEN_SIZE)
    direction[0] = 1.0
    model.model.embed_tokens.weight.copy_(direction.expand_as(model.model.embed_tokens.weight))
    model.lm_head.weight.zero_()
    model.lm_head.weight[VOCAB[word]] = direction
    return model


def generated_words(report, task: str) -> list[list[str]]:
    return [prediction.generated_text.split() for prediction in report.results[task].predictions]


# ---------------------------------------------------------------- answer rules

LABEL_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false. true would be wrong", "false"),
    ("boolq", "It is untrue and falsehood", None),  # embedded in longer words: no answer
    ("boolq", "True", None),  # the protocol's labels are lowercase
    ("boolq", "", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution1: cut it. the correct answer is solution1.", "solution1"),
    ("piqa", "solution3 then solution12", None),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer4 is not a choice here, answer2 is", "answer2"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "endings are hard; ending2", "ending2"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "option2option1", None),
    ("ARC-Challenge", "Answer1: rocks Answer2: trees the correct answer is answer2", "answer2"),
    ("ARC-Challenge", "the correct answer is answer5", "answer5"),
    ("ARC-Easy", "the correct answer is answer1, not answer4", "answer1"),
    ("ARC-Easy", "reanswer1 answer10", None),
    ("openbookqa", "the correct answer is answer4", "answer4"),
    ("openbookqa", "answer5 answer3", "answer3"),
]


@pytest.mark.parametrize(("task", "text", "expected"), LABEL_CASES)
def test_label_extraction_takes_first_whole_word_label(task: str, text: str, expected: str | None) -> None:
    assert extract_answer(task, text) == expected


NUMBER_CASES = [
    ("gsm8k", "He needs 36 * 2/3 = 24 sq ft, so 24 * 24 = 576 tiles. The answer is 576.", 576.0),
    ("gsm8k", "The total is 1,234 dollars.", 1234.0),
    ("gsm8k", "She earns $1,234,567.50 a year", 1234567.5),
    ("gsm8k", "Pick 1,2,3 and then 45", 45.0),
    ("MultiArith", "The temperature fell to -3 degrees", -3.0),
    ("MultiArith", "So 5-3=2", 2.0),
    ("MultiArith", "10 minus 13 is -3.", -3.0),
    ("AddSub", "Each gets 2/3 = 0.67 cups, or 0.6666", 0.6666),
    ("AddSub", "It weighs 9.8 kg.", 9.8),
    ("SingleEq", "The answer is 5.", 5.0),
    ("SingleEq", "x = 12.0", 12.0),
    ("SVAMP", "I do not know.", None),
    ("SVAMP", "", None),
]


@pytest.mark.parametrize(("task", "text", "expected"), NUMBER_CASES)
def test_number_extraction_takes_last_number(task: str, text: str, expected: float | None) -> None:
    parsed = extract_answer(task, text)
    if expected is None:
        assert parsed is None
    else:
        assert isinstance(parsed, float)
        assert math.isclose(parsed, expected)


AQUA_CASES = [
    ("The answer is (D).", "D"),
    ("Because each box costs 5, (B) is tempting. The answer is (D).", "D"),
    ("answer is C", "C"),
    ("The Answer is: E", "E"),
    ("Rationale: 23.65 - 0 = 23.65 (A)", "A"),
    ("Clearly option (C) fits best, not (E)", "C"),
    ("Dividing both sides gives E", "E"),
    ("Because Bob counted, no option", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), AQUA_CASES)
def test_aqua_extraction_reads_the_option_letter(text: str, expected: str | None) -> None:
    assert extract_answer("AQuA", text) == expected


def test_is_correct_compares_numbers_within_tolerance_and_labels_exactly() -> None:
    assert is_correct("AddSub", "so 2/3 = 0.667", "0.6666666666666666")  # off by 3.3e-4
    assert not is_correct("AddSub", "so 2/3 = 0.67", "0.6666666666666666")  # off by 3.3e-3
    assert is_correct("gsm8k", "The answer is 1,234.", "1234.0")
    assert is_correct("MultiArith", "The answer is 15", "15.0")
    assert is_correct("SVAMP", "it drops to -8", "-8.0")
    assert not is_correct("SVAMP", "it drops to -8", "8.0")
    assert not is_correct("gsm8k", "no number here", "0")
    assert is_correct("boolq", "the correct answer is false", "false")
    assert not is_correct("boolq", "the correct answer is false", "true")
    assert is_correct("AQuA", "The answer is (C).", "C")
    assert not is_correct("AQuA", "The answer is (C).", "A")
    assert not is_correct("piqa", "no idea", "solution1")


def test_task_names_match_case_insensitively_and_unknown_names_are_rejected() -> None:
    assert extract_answer("GSM8K", "The answer is 7") == 7.0
    assert extract_answer("arc-challenge", "answer2") == "answer2"
    assert extract_answer("BoolQ", "true") == "true"
    with pytest.raises(ValueError, match=r"Unknown task 'mmlu'.*boolq.*SVAMP"):
        extract_answer("mmlu", "true")
    with pytest.raises(ValueError, match="Unknown task"):
        is_correct("arc", "answer1", "answer1")


def test_every_task_of_the_protocol_is_known() -> None:
    assert set(TASKS) == {
        *("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"),
        *("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP"),
    }


def test_non_numeric_gold_answer_for_an_arithmetic_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'answer' field"):
        is_correct("gsm8k", "7", "seven")


# ---------------------------------------------------------------- prompts and data


def test_prompts_follow_the_alpaca_template_with_and_without_input() -> None:
    without_input = build_prompt({"instruction": "Add 2 and 3.", "input": "", "answer": "5"})
    assert without_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    with_input = build_prompt({"instruction": "Add the numbers.", "input": "2 and 3", "answer": "5"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_tasks_resolve_from_folder_file_groups_and_case() -> None:
    assert resolve_tasks(None, FIXTURES) == list(TASKS)  # the fixtures hold all fourteen
    assert resolve_tasks(None, FIXTURES / "gsm8k" / "test.json") == ["gsm8k"]
    assert resolve_tasks(["GSM8K", "boolq", "gsm8k"], FIXTURES) == ["gsm8k", "boolq"]
    assert resolve_tasks(["arithmetic"], FIXTURES) == ["MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP"]
    assert len(resolve_tasks(["commonsense"], FIXTURES)) == 8
    with pytest.raises(ValueError, match="exactly one task"):
        resolve_tasks(["boolq", "piqa"], FIXTURES / "boolq" / "test.json")


def test_records_load_from_folder_file_and_through_datasets() -> None:
    with open(FIXTURES / "SVAMP" / "test.json", encoding="utf-8") as handle:
        reference = json.load(handle)
    assert load_task_records("SVAMP", FIXTURES) == reference
    assert load_task_records("SVAMP", FIXTURES / "SVAMP" / "test.json", max_samples=2) == reference[:2]
    # `datasets.load_dataset` reads a local folder exactly as it reads a Hub repository with the same layout.
    assert load_hub_records(str(FIXTURES), "SVAMP") == reference


def test_missing_data_gives_errors_that_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="boolq"):
        load_task_records("boolq", tmp_path)
    with pytest.raises(FileNotFoundError, match="LLM-Adapters layout"):
        resolve_tasks(None, tmp_path)
    bad = tmp_path / "boolq" / "test.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([{"instruction": "q?"}]))
    with pytest.raises(ValueError, match=r"Record 0 .* lacks \['answer'\]"):
        load_task_records("boolq", tmp_path)


# ---------------------------------------------------------------- generation end to end

# (task, the word the model always writes, expected correct, fixture size). Hand counts of the fixtures' golds:
CONSTANT_MODEL_CASES = [
    ("boolq", "true", 3, 4),  # false, true, true, true
    ("piqa", "solution2", 3, 4),  # solution1, solution2, solution2, solution2
    ("social_i_qa", "answer1", 2, 4),  # answer3, answer1, answer2, answer1
    ("hellaswag", "ending3", 1, 3),  # ending1, ending3, ending2 (hand-written fixture)
    ("winogrande", "option2", 2, 4),  # option2, option1, option2, option1
    ("ARC-Challenge", "answer3", 2, 4),  # answer3, answer2, answer3, answer4
    ("ARC-Easy", "answer4", 2, 4),  # answer1, answer2, answer4, answer4
    ("openbookqa", "answer3", 2, 4),  # answer2, answer1, answer3, answer3
    ("MultiArith", "3", 1, 5),  # 15.0, 6.0, 3.0, 9.0, 35.0
    ("gsm8k", "576", 1, 5),  # 576.0, 120.0, 63.0, 16.0, 11.0
    ("AddSub", "0.667", 1, 5),  # 4, 9.8, 8, 52, 0.6666666666666666 (within 1e-3 of 0.667)
    ("AQuA", "(C)", 2, 5),  # A, C, D, C, A
    ("SingleEq", "5", 2, 5),  # 9.0, 0.6, 5.0, 5.0, 81.0
    ("SVAMP", "8", 1, 5),  # 8.0, 333.0, 2.0, 56.0, 14.0
]


@pytest.mark.parametrize(("task", "word", "correct", "total"), CONSTANT_MODEL_CASES)
def test_accuracy_on_fixtures_matches_hand_count(task: str, word: str, correct: int, total: int) -> None:
    report = evaluate(
        make_constant_model(word),
        make_tokenizer(),
        FIXTURES,
        [task],
        GenerationSettings(batch_size=2, max_new_tokens=3),
    )
    result = report.results[task]
    assert generated_words(report, task) == [[word] * 3] * total
    assert (result.correct, result.total) == (correct, total)
    assert result.accuracy == pytest.approx(correct / total)
    assert [prediction.gold_answer for prediction in result.predictions] == [
        record["answer"] for record in json.loads((FIXTURES / task / "test.json").read_text())
    ]


def test_default_lengths_are_32_tokens_for_commonsense_and_256_for_arithmetic() -> None:
    report = evaluate(make_constant_model("5"), make_tokenizer(), FIXTURES, ["boolq", "SingleEq"], max_samples=1)
    assert [len(words) for words in generated_words(report, "boolq")] == [32]
    assert [len(words) for words in generated_words(report, "SingleEq")] == [256]


def test_beam_search_runs_and_report_averages_tasks() -> None:
    report = evaluate(
        make_constant_model("true"),
        make_tokenizer(),
        FIXTURES,
        ["boolq", "gsm8k"],
        GenerationSettings(batch_size=4, num_beams=4, max_new_tokens=2),
    )
    # boolq 3/4 (golds false, true, true, true); gsm8k 0/5 ("true" holds no number)
    assert report.results["boolq"].correct == 3
    assert report.results["gsm8k"].correct == 0
    assert report.average == pytest.approx((3 / 4 + 0 / 5) / 2)
    assert report.group_averages() == pytest.approx({"commonsense": 0.75, "arithmetic": 0.0})
    assert all(prediction.parsed_answer is None for prediction in report.results["gsm8k"].predictions)


def test_left_padded_batches_generate_what_single_prompts_do() -> None:
    """On a random (not constant) model, any padding leak into the prompt would change the greedy continuation."""
    model, tokenizer = make_model(seed=3), make_tokenizer()
    records = load_task_records("SVAMP", FIXTURES)  # prompts of different lengths
    batched = evaluate_task(model, tokenizer, "SVAMP", records, GenerationSettings(batch_size=5, max_new_tokens=6))
    single = evaluate_task(model, tokenizer, "SVAMP", records, GenerationSettings(batch_size=1, max_new_tokens=6))
    assert [p.generated_text for p in batched.predictions] == [p.generated_text for p in single.predictions]
    assert len({p.generated_text for p in single.predictions}) > 1  # the model reacts to its prompt


# ---------------------------------------------------------------- adapters and the CLI


@torch.no_grad()
def save_true_lora_adapter(model: OlmoeForCausalLM, path: Path) -> None:
    """A LoRA on lm_head that turns the 'false' model into one that answers 'true'."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"]))
    lm_head = peft_model.base_model.model.lm_head
    lm_head.lora_A["default"].weight.zero_()
    lm_head.lora_A["default"].weight[0, 0] = 1.0
    lm_head.lora_B["default"].weight.zero_()
    lm_head.lora_B["default"].weight[VOCAB["true"], 0] = 10.0
    peft_model.save_pretrained(path, save_embedding_layers=False)


def run_eval_cli(model_dir: Path, output_dir: Path, *extra: str) -> dict:
    exit_code = main(
        [
            *("eval", "--model", str(model_dir), "--data-dir", str(FIXTURES), "--tasks", "boolq", "winogrande"),
            *("--max-new-tokens", "2", "--batch-size", "3", "--dtype", "float32", "--device", "cpu"),
            *("--output-dir", str(output_dir), *extra),
        ]
    )
    assert exit_code == 0
    return json.loads((output_dir / "results.json").read_text())


def test_cli_writes_results_markdown_and_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_constant_model("true").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    results = run_eval_cli(tmp_path / "model", tmp_path / "out")
    # boolq 3/4 (false, true, true, true); winogrande 0/4: "true" is no option
    assert results["tasks"]["boolq"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert results["tasks"]["winogrande"] == {"correct": 0, "total": 4, "accuracy": 0.0}
    assert results["average"] == pytest.approx(0.375)
    assert results["adapter"] is None
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| boolq | 3 | 4 | 75.00 |" in markdown
    assert "| **average** (2 tasks) | | | **37.50** |" in markdown
    assert "| boolq | 3 | 4 | 75.00 |" in capsys.readouterr().out
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert len(predictions) == 8
    assert predictions[0] == {
        "id": "boolq/0",
        "task": "boolq",
        "index": 0,
        "prompt": build_prompt(json.loads((FIXTURES / "boolq" / "test.json").read_text())[0]),
        "generated_text": "true true",
        "parsed_answer": "true",
        "gold_answer": "false",
        "correct": False,
    }
    assert predictions[4]["id"] == "winogrande/0"
    assert predictions[4]["parsed_answer"] is None


def test_cli_loads_a_peft_adapter_on_top_of_the_base_model(tmp_path: Path) -> None:
    make_constant_model("false").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    save_true_lora_adapter(make_constant_model("false"), tmp_path / "adapter")
    base = run_eval_cli(tmp_path / "model", tmp_path / "base")
    adapted = run_eval_cli(tmp_path / "model", tmp_path / "adapted", "--adapter", str(tmp_path / "adapter"))
    # golds false, true, true, true: the base model ('false') gets 1, the adapted one ('true') 3
    assert base["tasks"]["boolq"]["correct"] == 1
    assert adapted["tasks"]["boolq"]["correct"] == 3
    assert adapted["adapter"] == str(tmp_path / "adapter")


def test_cli_model_folder_without_tokenizer_fails_in_one_line_before_loading(tmp_path: Path) -> None:
    """Weights without tokenizer files: one line naming the folder and --tokenizer, not an IndexError from generate."""
    make_constant_model("true").save_pretrained(tmp_path / "model")
    environment = {key: value for key, value in os.environ.items() if key != "PEFT_PERFT_DEBUG"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_perft.cli",
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--data-dir",
            str(FIXTURES),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=environment,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("peft-perft eval")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--model {tmp_path / 'model'}: the model folder has no tokenizer" in lines[0]
    assert "--tokenizer" in lines[0]


def test_cli_takes_the_tokenizer_from_its_own_flag(tmp_path: Path) -> None:
    make_constant_model("true").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    results = run_eval_cli(tmp_path / "model", tmp_path / "out", "--tokenizer", str(tmp_path / "tokenizer"))
    assert results["tasks"]["boolq"] == {"correct": 3, "total": 4, "accuracy": 0.75}  # as with the tokenizer inside
    assert results["tokenizer"] == str(tmp_path / "tokenizer")


def test_load_model_refuses_a_folder_without_tokenizer(tmp_path: Path) -> None:
    make_constant_model("true").save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_model(str(tmp_path / "model"), dtype="float32", device="cpu")


@torch.no_grad()
def make_false_model_with_open_moe_input() -> OlmoeForCausalLM:
    """The constant 'false' model, but its MoE blocks see the embedding (through their input norm) and the model reads
    hidden direction e1 as 'true': a PERFT adapter writing e1 beside the zeroed experts flips the answer."""
    model = make_constant_model("false")
    for layer in model.model.layers:
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.lm_head.weight[VOCAB["true"], 1] = 1.0
    return model


@torch.no_grad()
def save_true_perft_adapter(model: OlmoeForCausalLM, path: Path) -> None:
    """A PERFT-R adapter whose four identical experts map the embedding direction e0 onto e1 in every MoE block;
    normalised top-2 weights sum to 1, so whatever the router picks adds the same e1 vector."""
    from peft import get_peft_model

    from peft_perft import PerftConfig, PerftMoeBlock

    peft_model = get_peft_model(model, PerftConfig(variant="R", r=1, lora_alpha=1, num_experts=4, top_k=2))
    blocks = [module for module in peft_model.modules() if isinstance(module, PerftMoeBlock)]
    assert len(blocks) == 2
    for block in blocks:
        block.perft_A["default"].zero_()
        block.perft_A["default"][:, 0, 0] = 1.0
        block.perft_B["default"].zero_()
        block.perft_B["default"][:, 1, 0] = 10.0
    peft_model.save_pretrained(path)


def test_cli_loads_a_perft_adapter_on_a_tiny_olmoe(tmp_path: Path) -> None:
    make_false_model_with_open_moe_input().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    save_true_perft_adapter(make_false_model_with_open_moe_input(), tmp_path / "adapter")
    base = run_eval_cli(tmp_path / "model", tmp_path / "base")
    adapted = run_eval_cli(tmp_path / "model", tmp_path / "adapted", "--adapter", str(tmp_path / "adapter"))
    # golds false, true, true, true: the base model ('false') gets 1, the PERFT-adapted one ('true') 3
    assert base["tasks"]["boolq"]["correct"] == 1
    assert adapted["tasks"]["boolq"]["correct"] == 3
    predictions = (tmp_path / "adapted" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(predictions[0])["generated_text"] == "true true"


@pytest.mark.parametrize(("content", "expected"), [("", "is not valid JSON"), ("[]", "holds no records")])
def test_an_empty_test_file_is_named_in_the_error(content: str, expected: str, tmp_path: Path) -> None:
    test_file = tmp_path / "boolq" / "test.json"
    test_file.parent.mkdir()
    test_file.write_text(content)
    with pytest.raises(ValueError) as error:
        load_json_records(test_file)
    assert str(test_file) in str(error.value) and expected in str(error.value)


def test_prompts_longer_than_the_context_are_refused_before_generating() -> None:
    """The bundled model has a 64-position context; the paper's boolq prompts do not fit in it with an answer."""
    from peft_perft.demo import BUNDLED_MODEL_DIR

    model, tokenizer = load_model(BUNDLED_MODEL_DIR, device="cpu")
    records = load_task_records("boolq", FIXTURES, max_samples=2)
    with pytest.raises(ValueError, match=r"2 of 2 boolq prompts plus 32 new tokens exceed the model's context of 64"):
        evaluate_task(model, tokenizer, "boolq", records)
