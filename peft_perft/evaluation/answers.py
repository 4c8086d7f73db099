"""Answer extraction and scoring for the fourteen LLM-Adapters benchmarks, usable without a model.

The rules follow the LLM-Adapters evaluation scripts used by the PERFT paper, with three documented refinements that
only matter on malformed outputs: labels must stand as whole words ("untrue" is not "true"), numbers keep their sign
only when the minus is not a subtraction ("5-3" ends in 3), and AQuA prefers "answer is (X)" over any capital letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["label", "number", "letter"]
ParsedAnswer = str | float | None


@dataclass(frozen=True)
class TaskSpec:
    """How one benchmark is prompted and scored."""

    name: str
    kind: TaskKind
    labels: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        """The paper's two benchmark families: 'commonsense' (label tasks) or 'arithmetic'."""
        return "commonsense" if self.kind == "label" else "arithmetic"

    @property
    def default_max_new_tokens(self) -> int:
        """LLM-Adapters generates 32 new tokens for a label and 256 for a worked arithmetic answer."""
        return 32 if self.kind == "label" else 256


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{number}" for number in range(1, count + 1))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("boolq", "label", ("true", "false")),
        TaskSpec("piqa", "label", _numbered("solution", 2)),
        TaskSpec("social_i_qa", "label", _numbered("answer", 3)),
        TaskSpec("hellaswag", "label", _numbered("ending", 4)),
        TaskSpec("winogrande", "label", _numbered("option", 2)),
        TaskSpec("ARC-Challenge", "label", _numbered("answer", 5)),
        TaskSpec("ARC-Easy", "label", _numbered("answer", 5)),
        TaskSpec("openbookqa", "label", _numbered("answer", 4)),
        TaskSpec("MultiArith", "number"),
        TaskSpec("gsm8k", "number"),
        TaskSpec("AddSub", "number"),
        TaskSpec("AQuA", "letter", ("A", "B", "C", "D", "E")),
        TaskSpec("SingleEq", "number"),
        TaskSpec("SVAMP", "number"),
    )
}
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "commonsense": tuple(name for name, spec in TASKS.items() if spec.group == "commonsense"),
    "arithmetic": tuple(name for name, spec in TASKS.items() if spec.group == "arithmetic"),
    "all": tuple(TASKS),
}
NUMBER_TOLERANCE = 1e-3

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?:(?<!\w)-)?\d+(?:\.\d+)?")
_AQUA_STATED = re.compile(r"(?i:answer is)\s*:?\s*\(?([A-E])\b")
_AQUA_PARENTHESISED = re.compile(r"\(([A-E])\)")
_AQUA_STANDALONE = re.compile(r"\b([A-E])\b")


def get_task(task: str) -> TaskSpec:
    """Look a task up by its LLM-Adapters folder name, ignoring case ('GSM8K', 'arc-easy')."""
    if task in TASKS:
        return TASKS[task]
    by_lower_name = {name.lower(): spec for name, spec in TASKS.items()}
    if task.lower() in by_lower_name:
        return by_lower_name[task.lower()]
    raise ValueError(f"Unknown task {task!r}. Known tasks (LLM-Adapters folder names): {', '.join(TASKS)}.")


def _extract_label(spec: TaskSpec, text: str) -> str | None:
    """First whole-word label, case-sensitive: the lowercase form is the answer, while the capitalised form
    ('Answer1:', 'Option2:') is how the question lists its choices, which a model may echo."""
    pattern = r"\b(" + "|".join(re.escape(label) for label in spec.labels) + r")\b"
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _extract_number(text: str) -> float | None:
    """Last number in the text, as LLM-Adapters reads a worked solution; '1,234' is one number."""
    numbers = _NUMBER.findall(_THOUSANDS_COMMA.sub("", text))
    return float(numbers[-1]) if numbers else None


def _extract_letter(text: str) -> str | None:
    """The AQuA option: 'answer is (X)' first, else the first '(X)', else the first standalone capital A-E."""
    for pattern in (_AQUA_STATED, _AQUA_PARENTHESISED, _AQUA_STANDALONE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def extract_answer(task: str, generated_text: str) -> ParsedAnswer:
    """Parse a model's generated text: a label string, a float for arithmetic tasks, or None when there is none."""
    spec = get_task(task)
    if spec.kind == "label":
        return _extract_label(spec, generated_text)
    if spec.kind == "number":
        return _extract_number(generated_text)
    return _extract_letter(generated_text)


def _parse_gold_number(task: str, gold_answer: str | float) -> float:
    try:
        return float(_THOUSANDS_COMMA.sub("", str(gold_answer)).strip())
    except ValueError:
        raise ValueError(
            f"Gold answer {gold_answer!r} of arithmetic task {task!r} is not a number; "
            "check the test file's 'answer' field."
        ) from None


def score_answer(task: str, parsed_answer: ParsedAnswer, gold_answer: str | float) -> bool:
    """Compare an already parsed answer with the gold one: numbers within 1e-3, labels and letters exactly."""
    spec = get_task(task)
    if parsed_answer is None:
        return False
    if spec.kind == "number":
        return abs(float(parsed_answer) - _parse_gold_number(task, gold_answer)) <= NUMBER_TOLERANCE
    return parsed_answer == str(gold_answer).strip()


def is_correct(task: str, generated_text: str, gold_answer: str | float) -> bool:
    """Whether a model's generated text answers correctly under the task's rule."""
    return score_answer(task, extract_answer(task, generated_text), gold_answer)
