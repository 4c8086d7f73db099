"""Layer discovery: the PERFT-adapted MoE blocks of a model, each with its qualified name and model layer index.

The routing monitor, the audit trace and the modality view all start here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..layer import PerftMoeBlock
from ..model import PerftModel


@dataclass(frozen=True)
class AdaptedLayer:
    """One PERFT-adapted MoE block, with its qualified name and the model layer it sits in."""

    name: str
    layer: int
    block: PerftMoeBlock


def find_adapted_layers(model: nn.Module) -> tuple[nn.Module, list[AdaptedLayer]]:
    """The module whose forward is the whole model (where PERFT's aux-loss hook sits) and its adapted blocks.

    Accepts a `PeftModel`, a model wrapped by DDP/FSDP/DeepSpeed, or a model with PERFT layers injected directly.
    """
    root = next((module.model for module in model.modules() if isinstance(module, PerftModel)), model)
    named_blocks = [(name, module) for name, module in root.named_modules() if isinstance(module, PerftMoeBlock)]
    if not named_blocks:
        raise ValueError(
            f"{type(model).__name__} holds no PERFT adapter (no PerftMoeBlock among its modules). Wrap the model "
            f"first with peft.get_peft_model(model, peft_perft.PerftConfig(...)) or load one with "
            f"PeftModel.from_pretrained."
        )
    return root, [
        AdaptedLayer(name, _layer_index(name, ordinal), block) for ordinal, (name, block) in enumerate(named_blocks)
    ]


def _layer_index(module_name: str, ordinal: int) -> int:
    """The model layer index in a name such as ``model.layers.3.mlp`` (``decoder.block.1.layer.2.mlp`` of a T5-style
    model: block 1, whose sub-layer 2 is its feed-forward); the block's rank when the name has none."""
    stacked = re.findall(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)(?=\.|$)", module_name)
    if stacked:
        return int(stacked[-1])
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", module_name)
    return int(numbers[-1]) if numbers else ordinal


def active_perft_adapters(layer: AdaptedLayer) -> list[str]:
    """Adapters of this block that run in its forward."""
    return layer.block.active_perft_adapters()
