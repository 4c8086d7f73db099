"""``peft-perft demo``: the bundled pretrained MoE fine-tuned with PERFT end to end.

One module per job: ``settings`` (the flags and the typed `DemoSettings` built from them once), ``checks`` (flags,
names and data checked before anything heavy), ``output`` (the output folder), ``run`` (the pipeline),
``scoring`` (accuracy and the reload check), ``pictures`` (heatmaps), ``report``; ``assets/`` holds the bundled
model.
What the pilot shares with the demo (model loading, the bundled task, data sets) lives in `peft_perft.workflow`;
the names re-exported below keep ``from peft_perft.demo import BUNDLED_MODEL_DIR`` working.
"""

from peft_perft.workflow import (
    BUNDLED_DATASET,
    BUNDLED_MODEL_DIR,
    CHECKPOINTING_FIELD,
    DemoTask,
    bundled_task,
    inference_mode,
    load_base_model,
    load_tokenizer,
    load_user_splits,
)

from .run import run_cli, run_demo
from .settings import DemoSettings, add_cli_arguments

__all__ = [
    "BUNDLED_DATASET",
    "BUNDLED_MODEL_DIR",
    "CHECKPOINTING_FIELD",
    "DemoSettings",
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
