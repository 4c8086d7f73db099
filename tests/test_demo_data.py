"""The demo's data generator: deterministic, held-out split disjoint from training, answers right."""

from __future__ import annotations

import string

import pytest

from peft_perft.workflow.bundled_tasks import (
    CHARACTERS,
    DEMO_TASKS,
    MAX_INPUT_LENGTH,
    MIN_INPUT_LENGTH,
    PRETRAINING_TASKS,
    demo_task_splits,
    pretraining_dataset,
)

# Independent answer rules, written with translation tables rather than the generator's per-character code.
NEXT_DIGIT = str.maketrans("0123456789", "1234567890")
NINES = str.maketrans("0123456789", "9876543210")
EXPECTED_ANSWER = {
    "copy": lambda text: text,
    "reverse": lambda text: "".join(reversed(text)),
    "upper": lambda text: text.translate(str.maketrans(string.ascii_lowercase, string.ascii_uppercase)),
    "next": lambda text: text.translate(NEXT_DIGIT),
    "lower": lambda text: text.translate(str.maketrans(string.ascii_uppercase, string.ascii_lowercase)),
    "nines": lambda text: "".join(reversed(text)).translate(NINES),
    "shout": lambda text: "".join(reversed(text)).translate(
        str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
    ),
}


def parse_prompt(prompt: str) -> tuple[str, str]:
    """Task name and input of a ``"<task>: <input> => "`` prompt."""
    assert prompt.endswith(" => "), prompt
    task, _, text = prompt[: -len(" => ")].partition(": ")
    return task, text


@pytest.fixture(scope="module")
def splits():
    return demo_task_splits(num_train=800, num_test=120, seed=3)


def test_demo_splits_are_deterministic_and_seed_dependent(splits):
    again = demo_task_splits(num_train=800, num_test=120, seed=3)
    assert splits["train"].to_list() == again["train"].to_list()
    assert splits["test"].to_list() == again["test"].to_list()
    other_seed = demo_task_splits(num_train=800, num_test=120, seed=4)
    assert splits["test"]["prompt"] != other_seed["test"]["prompt"]


def test_pretraining_mixture_is_deterministic():
    assert pretraining_dataset(300, seed=1).to_list() == pretraining_dataset(300, seed=1).to_list()
    assert pretraining_dataset(300, seed=1)["prompt"] != pretraining_dataset(300, seed=2)["prompt"]


def test_held_out_inputs_never_appear_in_training(splits):
    train_inputs = {parse_prompt(prompt)[1] for prompt in splits["train"]["prompt"]}
    test_inputs = {parse_prompt(prompt)[1] for prompt in splits["test"]["prompt"]}
    assert len(splits["test"]) == 120 and len(splits["train"]) == 800
    assert train_inputs.isdisjoint(test_inputs)
    assert len(set(splits["train"]["prompt"])) == len(splits["train"])


def test_every_answer_matches_an_independent_computation(splits):
    rows = [*splits["train"], *splits["test"], *pretraining_dataset(700, seed=0)]
    for row in rows:
        task, text = parse_prompt(row["prompt"])
        assert row["task"] == task
        assert MIN_INPUT_LENGTH <= len(text) <= MAX_INPUT_LENGTH
        assert row["completion"] == EXPECTED_ANSWER[task](text), row


def test_spot_checks_written_by_hand():
    answers = {task.name: task.solve for task in DEMO_TASKS}
    assert answers["next"]("3079") == "4180"
    assert answers["lower"]("ABC") == "abc"
    assert answers["nines"]("3071") == "8296"
    assert answers["shout"]("cab") == "BAC"


def test_sub_tasks_are_balanced_and_never_seen_in_pretraining(splits):
    demo_names = {task.name for task in DEMO_TASKS}
    assert demo_names.isdisjoint({task.name for task in PRETRAINING_TASKS})
    for split in ("train", "test"):
        counts = {name: splits[split]["task"].count(name) for name in demo_names}
        assert set(counts.values()) == {len(splits[split]) // len(demo_names)}, counts


def test_generated_text_uses_only_the_tokenizer_alphabet(splits):
    rows = [*splits["test"], *pretraining_dataset(200, seed=0)]
    used = set("".join(row["prompt"] + row["completion"] for row in rows))
    assert used <= set(CHARACTERS)
