"""What the demo's and the pilot's training runs share: TRL's settings, quiet dataset preparation, and the name of
the checkpointing field."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled
from trl import SFTConfig

# Transformers renamed gradient_checkpointing (now a deprecated alias that warns) to activation_checkpointing.
CHECKPOINTING_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__
    else "gradient_checkpointing"
)


@contextmanager
def datasets_progress_bars_off() -> Iterator[None]:
    """Hide the many one-line bars of dataset preparation so the training bar and the report stand out."""
    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def sft_config(
    output_dir: Path,
    device: torch.device,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    max_length: int,
    checkpointing: bool,
    **specific: Any,
) -> SFTConfig:
    """TRL's training settings as the demo and the pilot both run: no checkpoints saved, bf16 on a GPU and the CPU
    otherwise, data prepared in the main process; ``specific`` adds each tool's own (schedule, logging)."""
    return SFTConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        save_strategy="no",
        seed=seed,
        max_length=max_length,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        **{CHECKPOINTING_FIELD: checkpointing},
        **specific,
    )
