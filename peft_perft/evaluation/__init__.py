"""Evaluation with the PERFT paper's protocol (LLM-Adapters): prompts, answer rules, batched generation, reports.

`extract_answer` and `is_correct` are usable on their own; `load_model` + `evaluate` run a whole benchmark, and
`add_cli_arguments` / `run_cli` back `peft-perft eval`.
"""

from peft_perft.evaluation.answers import TASK_GROUPS, TASKS, extract_answer, get_task, is_correct, score_answer
from peft_perft.evaluation.command import add_cli_arguments, run_cli
from peft_perft.evaluation.data import build_prompt, load_task_records, resolve_tasks
from peft_perft.evaluation.runner import (
    EvaluationReport,
    GenerationSettings,
    Prediction,
    TaskResult,
    evaluate,
    evaluate_task,
    generate_batch,
    load_model,
)

__all__ = [
    "TASKS",
    "TASK_GROUPS",
    "EvaluationReport",
    "GenerationSettings",
    "Prediction",
    "TaskResult",
    "add_cli_arguments",
    "build_prompt",
    "evaluate",
    "evaluate_task",
    "extract_answer",
    "generate_batch",
    "get_task",
    "is_correct",
    "load_model",
    "load_task_records",
    "resolve_tasks",
    "run_cli",
    "score_answer",
]
