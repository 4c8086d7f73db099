"""The data the demo and the pilot train and score on: the bundled task, or a user data set as prompt/completion
splits, with how a generation counts as correct."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from peft_perft.evaluation import build_prompt, is_correct

from .bundled_tasks import DEMO_TASKS, MAX_INPUT_LENGTH, demo_task_splits

BUNDLED_DATASET = "bundled"
"""The ``--dataset`` value that picks the bundled task."""


ALL_TASKS = "all"


Scorer = Callable[[str, dict[str, Any]], bool]


@dataclass
class DemoTask:
    """What the demo trains on and scores: prompt/completion splits and how a generation counts as correct."""

    train: Dataset
    test: Dataset
    scorer: Scorer
    max_new_tokens: int
    description: str


def bundled_task(num_train: int, max_eval_samples: int, seed: int, max_new_tokens: int | None = None) -> DemoTask:
    """Four string sub-tasks the bundled model never saw, with the same number of held-out examples each."""
    per_task_test = max(1, max_eval_samples // len(DEMO_TASKS))
    splits = demo_task_splits(num_train=num_train, num_test=per_task_test * len(DEMO_TASKS), seed=seed)
    names = ", ".join(task.name for task in DEMO_TASKS)
    return DemoTask(
        splits["train"],
        splits["test"],
        exact_match_scorer,
        max_new_tokens or MAX_INPUT_LENGTH + 2,
        f"bundled task ({names})",
    )


def load_user_splits(dataset: str, max_eval_samples: int, seed: int) -> DatasetDict:
    """Train and test splits with prompt/completion/answer/task columns from a local file or a datasets name.

    A data set without a test split gets one: ``max_eval_samples`` records held out by a seeded shuffle.
    """
    path = Path(dataset)
    if path.is_file():
        loaded = DatasetDict({"train": load_dataset("json", data_files=str(path), split="train")})
    else:
        loaded = load_dataset(dataset)
    if "train" not in loaded:
        raise ValueError(
            f"Data set {dataset} has splits {list(loaded)}; the demo needs a 'train' split to fine-tune on."
        )
    if "test" not in loaded:
        held_out = min(max_eval_samples, len(loaded["train"]) // 5)
        if held_out < 1:
            raise ValueError(
                f"Data set {dataset} has {len(loaded['train'])} records: too few to hold out a test split."
            )
        loaded = loaded["train"].train_test_split(test_size=held_out, seed=seed)
    test = loaded["test"].select(range(min(max_eval_samples, len(loaded["test"]))))
    return DatasetDict({"train": to_prompt_completion(loaded["train"]), "test": to_prompt_completion(test)})


def to_prompt_completion(records: Dataset) -> Dataset:
    """Map prompt/completion records as they are, and LLM-Adapters records through the paper's Alpaca prompt."""
    columns = set(records.column_names)
    if {"prompt", "completion"} <= columns:
        convert = _from_prompt_completion
    elif {"instruction", "output"} <= columns or {"instruction", "answer"} <= columns:
        convert = _from_llm_adapters
    else:
        raise ValueError(
            f"Cannot use records with columns {sorted(columns)}: expected prompt/completion, or LLM-Adapters "
            "instruction/input/output (with an optional answer)."
        )
    return records.map(convert, remove_columns=records.column_names)


def _from_prompt_completion(record: dict[str, Any]) -> dict[str, str]:
    answer = record.get("answer")
    return {
        "prompt": record["prompt"],
        "completion": record["completion"],
        "answer": str(answer) if answer is not None else record["completion"],
        "task": str(record.get("task") or ALL_TASKS),
    }


def _from_llm_adapters(record: dict[str, Any]) -> dict[str, str]:
    answer = record.get("answer")
    output = record.get("output") or str(answer)
    return {
        "prompt": build_prompt(record),
        "completion": output,
        "answer": str(answer) if answer is not None else output,
        "task": str(record.get("task") or ALL_TASKS),
    }


def exact_match_scorer(generated: str, row: dict[str, Any]) -> bool:
    """The generation, stripped, is exactly the reference answer."""
    return generated.strip() == str(row.get("answer", row["completion"])).strip()


def answer_rule_scorer(eval_task: str) -> Scorer:
    """Score with an LLM-Adapters task's rule (last number, label word, option letter) against ``answer``."""
    return lambda generated, row: is_correct(eval_task, generated, row.get("answer", row["completion"]))
