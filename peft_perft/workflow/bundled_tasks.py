"""Synthetic string tasks for the bundled demo model: its pretraining mixture and the demo's fine-tuning task.

The bundled OLMoE is pretrained on generic skills (copy, reverse, upper-casing) so that it knows the
``"<task>: <input> => <output>"`` format and how to move characters around. The demo then fine-tunes it on
a *different* mixture of four sub-tasks it never saw, each with a per-character map it was never taught
(upper to lower case, nine's complement, digit plus one) or a new combination of skills (reverse and
upper-case), so the base model scores zero and the PERFT router has a reason to give each sub-task its own
experts.

Everything here is deterministic for a given seed, so the bundled weights and the demo's numbers can be
reproduced by anyone rerunning ``scripts/train_demo_model.py`` and ``peft-perft demo``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

LOWERCASE = string.ascii_lowercase
UPPERCASE = string.ascii_uppercase
DIGITS = string.digits
BINARY = "ab"
PROMPT_SEPARATOR = " => "
# Every character the generator can emit; the bundled character-level tokenizer has exactly these.
CHARACTERS = LOWERCASE + UPPERCASE + DIGITS + " :=>"
MIN_INPUT_LENGTH = 3
MAX_INPUT_LENGTH = 8


def _next_digit(character: str) -> str:
    """The digit one higher, wrapping 9 to 0."""
    return str((int(character) + 1) % 10)


def _nines_complement(character: str) -> str:
    """The digit that adds up to nine with this one."""
    return str(9 - int(character))


@dataclass(frozen=True)
class StringTask:
    """One sub-task: a name shown in the prompt, the alphabet its inputs are drawn from, and its answer rule."""

    name: str
    alphabet: str
    solve: Callable[[str], str]


PRETRAINING_TASKS: tuple[StringTask, ...] = (
    StringTask("copy", LOWERCASE, lambda text: text),
    StringTask("copy", UPPERCASE, lambda text: text),
    StringTask("copy", DIGITS, lambda text: text),
    StringTask("reverse", LOWERCASE, lambda text: text[::-1]),
    StringTask("reverse", UPPERCASE, lambda text: text[::-1]),
    StringTask("reverse", DIGITS, lambda text: text[::-1]),
    StringTask("upper", LOWERCASE, str.upper),
    # Strings over two letters repeat characters so often that copying by "what followed the character I just
    # wrote" fails; they make the model copy by position, which the demo's per-character maps then build on.
    StringTask("copy", BINARY, lambda text: text),
    StringTask("reverse", BINARY, lambda text: text[::-1]),
)

# The demo task: four sub-tasks the base model never saw, on different alphabets and with different maps.
DEMO_TASKS: tuple[StringTask, ...] = (
    StringTask("lower", UPPERCASE, str.lower),
    StringTask("nines", DIGITS, lambda text: "".join(_nines_complement(c) for c in text[::-1])),
    StringTask("shout", LOWERCASE, lambda text: text[::-1].upper()),
    StringTask("next", DIGITS, lambda text: "".join(_next_digit(c) for c in text)),
)


def format_prompt(task_name: str, text: str) -> str:
    """The prompt the model completes; the answer follows the separator directly."""
    return f"{task_name}: {text}{PROMPT_SEPARATOR}"


def _random_text(rng: random.Random, alphabet: str) -> str:
    length = rng.randint(MIN_INPUT_LENGTH, MAX_INPUT_LENGTH)
    return "".join(rng.choice(alphabet) for _ in range(length))


def _example(task: StringTask, text: str) -> dict[str, str]:
    return {"prompt": format_prompt(task.name, text), "completion": task.solve(text), "task": task.name}


def _sample_examples(
    tasks: Sequence[StringTask], count: int, rng: random.Random, excluded_prompts: set[str] | None = None
) -> list[dict[str, str]]:
    """Draw ``count`` examples, cycling through the tasks so every sub-task is equally represented.

    With ``excluded_prompts`` (a set, possibly empty) the examples are also distinct from each other and from
    those prompts; without it they are drawn independently (repeats allowed, as tiny alphabets need).
    """
    examples: list[dict[str, str]] = []
    while len(examples) < count:
        task = tasks[len(examples) % len(tasks)]
        example = _example(task, _random_text(rng, task.alphabet))
        if excluded_prompts is None:
            examples.append(example)
        elif example["prompt"] not in excluded_prompts:
            excluded_prompts.add(example["prompt"])
            examples.append(example)
    return examples


def pretraining_dataset(num_examples: int, seed: int = 0) -> Dataset:
    """The generic-skills mixture the bundled base model is trained on (prompt/completion/task columns)."""
    rng = random.Random(f"pretraining-{seed}")
    return Dataset.from_list(_sample_examples(PRETRAINING_TASKS, num_examples, rng))


def demo_task_splits(num_train: int = 2000, num_test: int = 200, seed: int = 0) -> DatasetDict:
    """The demo's fine-tuning task: a train split and a held-out test split with no input string in common.

    The test split is drawn first and its input strings are then excluded from training for every sub-task,
    so the accuracy measured on it is on examples the adapter never saw in any form.
    """
    rng = random.Random(f"demo-task-{seed}")
    test = _sample_examples(DEMO_TASKS, num_test, rng, excluded_prompts=set())
    test_inputs = {_input_text(example["prompt"]) for example in test}
    blocked = {format_prompt(task.name, text) for task in DEMO_TASKS for text in test_inputs}
    train = _sample_examples(DEMO_TASKS, num_train, rng, excluded_prompts=blocked)
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def _input_text(prompt: str) -> str:
    """The input string of a prompt made by ``format_prompt``."""
    return prompt.split(": ", 1)[1].removesuffix(PROMPT_SEPARATOR)
