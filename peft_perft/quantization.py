"""Load a frozen MoE base quantized, for PERFT to train beside it (QLoRA-style).

PERFT never changes the frozen experts, so they can stay in any storage. Two families are offered:

- ``bnb4`` / ``bnb8``: bitsandbytes NF4 / LLM.int8() on the model's ``nn.Linear`` layers (attention, Linear routers,
  shared experts); fused 3-D expert weights are not Linear layers and stay in ``dtype``.
- ``int8-experts``: torchao int8 weight-only on the fused expert weights (the bulk of an MoE), everything else in
  ``dtype``. It runs with the ``eager`` experts implementation: the grouped ones call ops torchao's tensors lack.
  The weights are quantized after loading with ``torchao.quantization.quantize_``, so Transformers does not mark the
  model as quantized by a method it considers not trainable (its Trainer refuses ``TorchAoConfig(FqnToConfig(...))``
  models, whose config class name carries no bit width).
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from .architectures import find_moe_blocks

QUANTIZE_CHOICES = ("bnb4", "bnb8", "int8-experts")
BNB_CPU_PACK_BLOCK = 32
"""bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel in blocks of 32 output rows."""

logger = logging.getLogger(__name__)


def bitsandbytes_config(kind: str, dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """NF4 with ``dtype`` compute (and double quantization) for ``bnb4``, LLM.int8() for ``bnb8``."""
    if kind == "bnb4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if kind == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"{kind!r} is not a bitsandbytes scheme; choose 'bnb4' or 'bnb8'.")


def load_quantized_base(
    model_name_or_path: str, kind: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Module:
    """The causal LM at ``model_name_or_path`` on ``device``, quantized with ``kind`` (one of QUANTIZE_CHOICES)."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"Unknown quantization {kind!r}; choose one of {', '.join(QUANTIZE_CHOICES)}.")
    if kind in ("bnb4", "bnb8"):
        return AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            dtype=dtype,
            quantization_config=bitsandbytes_config(kind, dtype),
            device_map={"": torch.device(device)},
        )
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, experts_implementation="eager")
    return quantize_experts_int8(model.to(device))


def keep_small_4bit_layers_unpacked(model: nn.Module) -> list[str]:
    """Turn off bitsandbytes' CPU repacking on the 4-bit layers it cannot repack; their names.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight at its first inference call into
    blocks of 32 output rows and one quantization block per row segment, and fails (``shape '[N, 0]' is invalid``)
    when the output width is not a multiple of 32 or the input width not a multiple of the quantization block size:
    MoE routers, whose width is the expert count (8 for Mixtral, 60 for Qwen1.5-MoE), are such layers, and so is every
    layer of a tiny test model. Those layers keep the generic 4-bit kernel, which computes the same product; the
    others are left alone."""
    skipped = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        block_size = getattr(getattr(module.weight, "quant_state", None), "blocksize", 1)
        if module.out_features % BNB_CPU_PACK_BLOCK or module.in_features % block_size or module.in_features % 2:
            module.support_avx512bf16_for_cpu = False
            skipped.append(name)
    if skipped:
        logger.info(
            "bitsandbytes' CPU repacking turned off for %d 4-bit layers it cannot repack: %s",
            len(skipped),
            ", ".join(skipped),
        )
    return skipped


def expert_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of the fused 3-D expert weights of every MoE block PERFT finds."""
    names = []
    for block_name, spec in find_moe_blocks(model).items():
        if spec.experts_name is None:
            continue
        experts_path = ".".join(part for part in (block_name, spec.experts_name) if part)
        experts = model.get_submodule(experts_path)
        names += [f"{experts_path}.{name}" for name, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    return names


def quantize_experts_int8(model: nn.Module) -> nn.Module:
    """Quantize the fused expert weights of ``model`` in place to torchao int8 weight-only; returns the model.

    Needs the ``eager`` experts implementation, which is set here (torchao's int8 tensors lack the ops of the
    grouped implementations)."""
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

    names = expert_weight_names(model)
    if not names:
        raise ValueError(
            f"Found no fused 3-D expert weights in this {type(model).__name__}: int8-experts quantizes those only. "
            f"Use 'bnb4' or 'bnb8' for a model whose experts are Linear layers."
        )
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    quantize_(model, FqnToConfig({name: Int8WeightOnlyConfig() for name in names}), filter_fn=None)
    return model


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--quantize`` flag of ``peft-perft demo`` and ``peft-perft pilot``: train on a quantized frozen base."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="load the frozen base quantized: bnb4 (NF4) / bnb8 on its Linear layers with bitsandbytes, int8-experts "
        "on its fused experts with torchao (default: unquantized)",
    )
