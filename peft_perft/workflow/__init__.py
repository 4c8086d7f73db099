"""What the demo and the pilot share: loading the base model and tokenizer, the bundled task and user data sets as
prompt/completion splits, and the pieces of their training runs.

``demo`` and ``pilot`` both build on this package and never import each other. ``models`` loads the frozen base,
``data`` the splits and scorers, ``bundled_tasks`` generates the bundled synthetic task (and the bundled model's
pretraining mixture), ``training`` holds what their TRL runs share.
"""

from .data import (
    ALL_TASKS,
    BUNDLED_DATASET,
    DemoTask,
    Scorer,
    answer_rule_scorer,
    bundled_task,
    exact_match_scorer,
    load_user_splits,
    to_prompt_completion,
)
from .models import BUNDLED_MODEL_DIR, inference_mode, load_base_model, load_tokenizer
from .training import CHECKPOINTING_FIELD, datasets_progress_bars_off, sft_config

__all__ = [
    "ALL_TASKS",
    "BUNDLED_DATASET",
    "BUNDLED_MODEL_DIR",
    "CHECKPOINTING_FIELD",
    "DemoTask",
    "Scorer",
    "answer_rule_scorer",
    "bundled_task",
    "datasets_progress_bars_off",
    "exact_match_scorer",
    "inference_mode",
    "load_base_model",
    "load_tokenizer",
    "load_user_splits",
    "sft_config",
    "to_prompt_completion",
]
