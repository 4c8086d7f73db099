"""Sharing on the Hugging Face Hub: the PERFT model card written on save and push, and the hooks that write it.

Import the public names from here; ``peft_perft.hub.model_card`` holds the code.
"""

from .model_card import CardDetails, render_model_card, set_card_details, write_model_card

__all__ = ["CardDetails", "render_model_card", "set_card_details", "write_model_card"]
