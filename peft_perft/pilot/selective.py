"""Selective PERFT-E in the pilot: the experts the pilot's own training slice uses, measured before any training.

The grid key ``E_sel`` is PERFT-E on the experts that receive ``SELECTIVE_MASS`` of each MoE block's routing of the
training examples (`peft_perft.selection.select_experts` on the frozen base), at the rank that brings it to the
shared parameter budget: fewer adapter experts, so a higher rank than full PERFT-E at the same budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import PerftConfig
from ..selection import ExpertSelection, select_experts
from ..workflow import load_base_model, load_tokenizer

SELECTIVE_KEY = "E_sel"
SELECTIVE_MASS = 0.8


def measure_selection(settings: Any, train: Any, device: torch.device, log: Callable[[str], object]) -> ExpertSelection:
    """The experts of each block that receive SELECTIVE_MASS of the training slice's routing, logged per block."""
    model = load_base_model(settings.model, device, settings.quantize)
    selection = select_experts(
        model,
        train.select_columns(["prompt", "completion"]),
        mass=SELECTIVE_MASS,
        tokenizer=load_tokenizer(settings.model),
        batch_size=settings.batch_size,
        description=f"the pilot's {len(train)} training examples",
    )
    adapted = sum(len(experts) for experts in selection.experts.values())
    total = sum(len(load) for load in selection.loads.values())
    log(f"[pilot] {SELECTIVE_KEY}: {adapted} of {total} experts carry {SELECTIVE_MASS:.0%} of the routing per block")
    del model
    return selection


def selective_config(selection: ExpertSelection, rank: int, alpha_per_rank: int) -> PerftConfig:
    """Selective PERFT-E at ``rank``, scaled as the pilot scales every configuration (alpha = alpha_per_rank * r)."""
    return selection.config(r=rank, lora_alpha=alpha_per_rank * rank, task_type="CAUSAL_LM")
