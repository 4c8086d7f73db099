"""Whether prompts leave room in a model's context for the tokens generated after them: one rule for every tool.

A prompt whose length plus the new tokens exceeds the positions the model was trained on is answered from cut or
out-of-range positions, so evaluation and the demo refuse such data before generating; both ask this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class ContextOverflow:
    """The prompts (by length in tokens) that do not fit ``context`` positions with ``max_new_tokens`` after them."""

    context: int
    max_new_tokens: int
    too_long: tuple[int, ...]
    prompts: int

    @property
    def longest(self) -> int:
        return max(self.too_long)


def context_length(config: PretrainedConfig) -> int | None:
    """The positions the (text) model attends to, or None where the configuration does not say."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def prompts_past_the_context(
    config: PretrainedConfig, prompt_lengths: Sequence[int], max_new_tokens: int
) -> ContextOverflow | None:
    """The prompts that overflow the model's context once ``max_new_tokens`` are generated, or None if all fit (or
    the context is unknown)."""
    context = context_length(config)
    if context is None:
        return None
    too_long = tuple(length for length in prompt_lengths if length + max_new_tokens > context)
    return ContextOverflow(context, max_new_tokens, too_long, len(prompt_lengths)) if too_long else None
