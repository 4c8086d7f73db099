"""`peft_perft.context`: the one rule for prompts that leave no room for the answer, shared by eval and the demo."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoTokenizer, OlmoeConfig, PretrainedConfig, Qwen3VLMoeConfig

from peft_perft.cli.inputs import InputError
from peft_perft.context import context_length, prompts_past_the_context
from peft_perft.demo import BUNDLED_MODEL_DIR, DemoSettings
from peft_perft.demo.checks import check_data_fits


def test_prompts_that_overflow_with_the_new_tokens_are_named() -> None:
    config = OlmoeConfig(max_position_embeddings=64)
    overflow = prompts_past_the_context(config, [10, 40, 33, 55], max_new_tokens=32)
    assert overflow is not None
    assert (overflow.context, overflow.too_long, overflow.prompts, overflow.longest) == (64, (40, 33, 55), 4, 55)
    assert prompts_past_the_context(config, [10, 32], max_new_tokens=32) is None  # 32 + 32 = 64 fits exactly


def test_the_text_model_context_counts_for_a_vision_language_model() -> None:
    config = Qwen3VLMoeConfig(text_config={"max_position_embeddings": 128})
    assert context_length(config) == 128
    assert prompts_past_the_context(config, [100], max_new_tokens=29).too_long == (100,)


def test_an_unknown_context_refuses_nothing() -> None:
    config = PretrainedConfig()  # says nothing about positions
    assert context_length(config) is None
    assert prompts_past_the_context(config, [10**6], max_new_tokens=10) is None


def test_the_demo_refuses_held_out_prompts_past_the_bundled_models_context() -> None:
    """`peft-perft demo`'s data check asks the same rule: a 60-character prompt plus 12 new tokens exceeds 64."""
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    config = AutoConfig.from_pretrained(BUNDLED_MODEL_DIR)
    args = DemoSettings(dataset="mine.json", max_length=512)
    texts = {"train": ["copy: abc => abc"], "test": ["copy: " + "a" * 54, "copy: ab => "]}
    with pytest.raises(InputError, match=r"1 held-out prompts plus 12 generated tokens .* \(64 positions; longest"):
        check_data_fits(texts, tokenizer, config, args, max_new_tokens=12, log=lambda _: None)
    texts["test"] = ["copy: ab => "]
    assert check_data_fits(texts, tokenizer, config, args, max_new_tokens=12, log=lambda _: None) == 64
