"""``peft-perft demo``: the bundled pretrained MoE fine-tuned with PERFT end to end.

``run`` is the pipeline and its command line; ``data`` generates the bundled tasks; ``assets/`` holds the bundled
model. The names below are what the CLI and the other tools (the pilot) use.
"""

from .run import (
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    CHECKPOINTING_FIELD,
    DemoTask,
    add_cli_arguments,
    bundled_task,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
    run_cli,
    run_demo,
)

__all__ = [
    "BUNDLED_DATASET",
    "BUNDLED_MODEL_DIR",
    "CHECKPOINTING_FIELD",
    "DemoTask",
    "add_cli_arguments",
    "bundled_task",
    "inference_mode",
    "load_base_model",
    "load_tokenizer",
    "load_user_splits",
    "run_cli",
    "run_demo",
]
