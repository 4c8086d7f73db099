"""Test sets in the LLM-Adapters format and the Alpaca-style prompt the PERFT paper evaluates with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft_perft.evaluation.answers import TASK_GROUPS, get_task

PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
REQUIRED_FIELDS = ("instruction", "answer")
TEST_FILE_NAME = "test.json"


def build_prompt(record: dict[str, Any]) -> str:
    """The prompt a record is evaluated with; the model must write the answer itself (no answer prefix)."""
    input_text = (record.get("input") or "").strip()
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=input_text)
    return PROMPT_WITHOUT_INPUT.format(instruction=record["instruction"])


def resolve_tasks(requested: list[str] | None, data_source: str | Path) -> list[str]:
    """Expand group names ('commonsense', 'arithmetic', 'all') and canonicalise task names.

    With no request, a local folder contributes the tasks it holds, and a Hub dataset all fourteen.
    """
    source = Path(data_source)
    if requested:
        names = [name for item in requested for name in TASK_GROUPS.get(item.lower(), (item,))]
        tasks = list(dict.fromkeys(get_task(name).name for name in names))
        if (source.is_file() or (source / TEST_FILE_NAME).is_file()) and len(tasks) != 1:
            raise ValueError(f"{source} holds a single test file, so name exactly one task with --tasks, not {tasks}.")
        return tasks
    if source.is_file() or (source / TEST_FILE_NAME).is_file():
        try:
            return [get_task((source.parent if source.is_file() else source).name).name]
        except ValueError:
            raise ValueError(
                f"Cannot tell the task of {source} from its folder name; name the folder after an LLM-Adapters task "
                f"(boolq, gsm8k, ...), or with peft-perft eval pass --tasks."
            ) from None
    if source.is_dir():
        present = [name for name in TASK_GROUPS["all"] if (source / name / TEST_FILE_NAME).is_file()]
        if not present:
            raise FileNotFoundError(
                f"No <task>/{TEST_FILE_NAME} files under {source}; expected the LLM-Adapters layout, "
                f"e.g. {source / 'boolq' / TEST_FILE_NAME}, or one task's folder holding {TEST_FILE_NAME}."
            )
        return present
    return list(TASK_GROUPS["all"])


def _validate(records: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(records, list):
        raise ValueError(f"{where} must hold a JSON list of records, found {type(records).__name__}.")
    for index, record in enumerate(records):
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            raise ValueError(f"Record {index} of {where} lacks {missing}; LLM-Adapters records need {REQUIRED_FIELDS}.")
    return records


def load_json_records(path: str | Path) -> list[dict[str, Any]]:
    """Read one LLM-Adapters test file from disk."""
    with open(path, encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); an LLM-Adapters test file is one JSON list of records."
            ) from None
    if not records:
        raise ValueError(f"{path} holds no records; an LLM-Adapters test file is a non-empty JSON list of records.")
    return _validate(records, str(path))


def load_hub_records(repo_id: str, task: str) -> list[dict[str, Any]]:
    """Read `<task>/test.json` of a dataset repository (Hub id or local folder) through `datasets`."""
    import datasets

    try:
        dataset = datasets.load_dataset(repo_id, data_files=f"{task}/{TEST_FILE_NAME}", split="train")
    except Exception as error:
        raise FileNotFoundError(
            f"Could not load {task}/{TEST_FILE_NAME} from {repo_id!r}: it is not a local file or folder, and loading "
            f"it as a Hugging Face Hub dataset failed ({type(error).__name__}: {error}). Pass a local file, a folder "
            f"laid out as <root>/<task>/{TEST_FILE_NAME}, or a Hub dataset with that layout."
        ) from error
    return _validate(dataset.to_list(), f"{repo_id}/{task}/{TEST_FILE_NAME}")


def load_task_records(task: str, data_source: str | Path, max_samples: int | None = None) -> list[dict[str, Any]]:
    """Records of one task from a test file, an LLM-Adapters folder, or a Hub dataset; the first `max_samples`."""
    source = Path(data_source)
    if source.is_file():
        records = load_json_records(source)
    elif (source / TEST_FILE_NAME).is_file():  # one task's folder
        records = load_json_records(source / TEST_FILE_NAME)
    elif source.is_dir():
        path = source / task / TEST_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"Task {task!r} has no test file at {path} (LLM-Adapters layout <root>/<task>/).")
        records = load_json_records(path)
    else:
        records = load_hub_records(str(data_source), task)
    return records if max_samples is None else records[:max_samples]
