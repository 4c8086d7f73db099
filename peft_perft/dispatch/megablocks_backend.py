"""``megablocks`` backend: MegaBlocks' dropless machinery for the adapter experts (CUDA only, optional extra).

Uses MegaBlocks' (0.10) radix ``sort`` of the expert ids, ``histogram`` and ``inclusive_cumsum`` for the bins,
``gather`` of the token rows into expert order, the ``grouped_gemm`` package's ``gmm`` through
``megablocks.grouped_gemm_util`` for both projections, and ``scatter``, which weights each pair by its routing
weight, sums the K pairs of a token, and gives the routing weights their gradient. MegaBlocks is imported only
when a CUDA tensor asks for it, so CPU installs never need it. ``gmm`` takes bf16 only and its group sizes on
the host (one device-to-host copy per call).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from . import Activation, register_backend
from .dense import dense_routed
from .sorting import pad_rank, sorting_pays_off

_RANK_MULTIPLE = 8  # grouped_gemm's bf16 kernels want 16-byte aligned rows


@functools.cache
def _megablocks() -> tuple[ModuleType, ModuleType] | None:
    """``(megablocks.ops, grouped_gemm ops)`` if MegaBlocks, its CUDA ops and grouped_gemm import; else None."""
    try:
        ops = importlib.import_module("megablocks.ops")
        grouped_gemm = importlib.import_module("megablocks.grouped_gemm_util")
    except (ImportError, RuntimeError, OSError):
        return None
    if not grouped_gemm.grouped_gemm_is_available():
        return None
    return ops, grouped_gemm.ops


def megablocks_routed(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Gather rows into expert bins, two grouped GEMMs, weighted scatter back into the tokens."""
    num_tokens, top_k = expert_index.shape
    if num_tokens * top_k == 0:
        return dense_routed(hidden, lora_A, lora_B, expert_index, expert_weight, activation)
    modules = _megablocks()
    if modules is None:
        raise RuntimeError("The 'megablocks' dispatch backend needs MegaBlocks; see the README's install steps.")
    ops, grouped_gemm = modules
    lora_A, lora_B = pad_rank(lora_A, lora_B, _RANK_MULTIPLE)
    num_experts = lora_A.shape[0]
    with torch.no_grad():
        flat_experts = expert_index.reshape(-1).int()
        bin_ids, indices = ops.sort(flat_experts, max(1, (num_experts - 1).bit_length()))
        tokens_per_expert = ops.histogram(flat_experts, num_experts)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0).view(-1)
        group_sizes = tokens_per_expert.cpu().long()
    rows = ops.gather(hidden.contiguous(), indices, bin_ids, bins, top_k)
    down = grouped_gemm.gmm(rows, lora_A.contiguous(), group_sizes, trans_b=True)
    if activation is not None:
        down = activation(down)
    up = grouped_gemm.gmm(down.contiguous(), lora_B.contiguous(), group_sizes, trans_b=True)
    pair_weight = expert_weight.reshape(-1).to(up.dtype).contiguous()
    return ops.scatter(up, indices, bin_ids, pair_weight, bins, top_k)


def _supports(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """CUDA bf16 in eager mode with MegaBlocks and grouped_gemm installed."""
    if hidden.device.type != "cuda" or hidden.dtype != torch.bfloat16 or lora_A.dtype != torch.bfloat16:
        return False
    if torch.compiler.is_compiling():
        return False
    return _megablocks() is not None


def _refuses(hidden_size: int, dtype: torch.dtype) -> str | None:
    """grouped_gemm's ``gmm`` takes bf16 rows aligned to 16 bytes: the adapter's dtype, and its hidden size."""
    if dtype != torch.bfloat16:
        return (
            f"MegaBlocks' grouped GEMM takes bf16 only and this adapter is {dtype} (peft upcasts adapters to float32 "
            f"unless get_peft_model(..., autocast_adapter_dtype=False) on a bf16 model)"
        )
    if hidden_size % _RANK_MULTIPLE:
        return f"MegaBlocks' grouped GEMM needs bf16 rows aligned to 16 bytes; hidden size {hidden_size} is not"
    return None


def _preferred(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """Where sorting pays off at all (the CPU-fitted cost model; not yet measured on a GPU); decode steps and
    small N / K go to cheaper backends."""
    return sorting_pays_off(hidden, lora_A, expert_index)


register_backend("megablocks", megablocks_routed, _supports, priority=30, preferred=_preferred, refuses=_refuses)
