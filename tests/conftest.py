"""Tiny MoE models built from configs, so that tests need no network."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GptOssConfig,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
)

TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")


TINY_MOE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    **TOKEN_IDS,
}
"""What every tiny model shares: the sizes and special tokens; each family adds its own names and layout."""


def tiny_olmoe_config(**overrides) -> OlmoeConfig:
    """OLMoE shape in miniature: 4 experts, top-2, no top-k renormalisation (as the real OLMoE)."""
    layout = {"num_hidden_layers": 2, "num_key_value_heads": 4, "num_experts": 4, "norm_topk_prob": False}
    return OlmoeConfig(**{**TINY_MOE, **layout, **overrides})


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    """Mixtral shape in miniature: 4 experts, top-2, renormalised top-k weights."""
    layout = {"num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4}
    return MixtralConfig(**{**TINY_MOE, **layout, **overrides})


def tiny_gpt_oss_config(**overrides) -> GptOssConfig:
    """GPT-OSS shape in miniature, one layer: 4 experts, top-2, router bias, softmax over the top-k logits."""
    layout = {"num_hidden_layers": 1, "num_key_value_heads": 4, "num_local_experts": 4, "head_dim": 8}
    return GptOssConfig(**{**TINY_MOE, **layout, **overrides})


def build_tiny(family: str = "olmoe", seed: int = 0, **overrides) -> torch.nn.Module:
    """A freshly initialised tiny model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if family == "olmoe":
        model = OlmoeForCausalLM(tiny_olmoe_config(**overrides))
    else:
        model = MixtralForCausalLM(tiny_mixtral_config(**overrides))
    return model.eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of token ids (2 x 7) that avoids the special tokens."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (2, 7), generator=generator)


def char_tokenizer(characters: str) -> PreTrainedTokenizerFast:
    """One token per character, with pad/eos/bos at ids 0/1/2 as in the tiny models' configs (no Hub needed)."""
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocabulary.update({character: len(SPECIAL_TOKENS) + index for index, character in enumerate(characters)})
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
