"""Sharing on the Hugging Face Hub: the PERFT model card written on save and push, and the hooks that write it.

Import the public names from here; ``peft_perft.hub.model_card`` holds the code.
"""

from .model_card import (
    CardDetails,
    pushing_saved_folder,
    render_model_card,
    set_card_details,
    with_perft_card,
    write_model_card,
)

__all__ = [
    "CardDetails",
    "pushing_saved_folder",
    "render_model_card",
    "set_card_details",
    "with_perft_card",
    "write_model_card",
]
