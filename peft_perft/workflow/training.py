"""What the demo's and the pilot's training runs share: quiet dataset preparation and TRL's checkpointing field."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
