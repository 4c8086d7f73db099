"""Loading the frozen base model and its tokenizer as the demo and the pilot train and score them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from peft_perft.quantization import load_quantized_base

BUNDLED_MODEL_DIR = str(Path(__file__).resolve().parents[1] / "demo" / "assets" / "demo-olmoe")
"""The bundled tiny OLMoE's folder, as a ``str``: every Hugging Face API takes it (TRL's ``SFTTrainer(model=...)``
takes a model id or path as a string, not a ``Path``)."""


def load_tokenizer(model_name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padded for batched generation, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {model_name_or_path} has neither a pad nor an eos token; add one.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_name_or_path: str, device: torch.device, quantize: str | None = None) -> torch.nn.Module:
    """The frozen base: float32 on a CPU (exact reload check), bfloat16 on a GPU; quantized if ``quantize`` names
    one of peft_perft.quantization's schemes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantize:
        return load_quantized_base(model_name_or_path, quantize, dtype, device).eval()
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    return model.to(device).eval()


def inference_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, and no router logits: TRL turns them on for the aux loss, and generation cannot use them."""
    model.config.get_text_config().output_router_logits = False
    return model.eval()
