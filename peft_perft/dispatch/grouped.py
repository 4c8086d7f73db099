"""``grouped_mm`` backend: PyTorch's native grouped GEMM over the routing's pairs sorted by expert.

Each selected (token, expert) pair costs 2 * r * D multiply-adds instead of the dense backend's 2 * N * r * D per
token, at the price of a sort, a gather of T*K rows and a scatter back. The kernel's rules are kept here:
int32 group ends, 16-byte aligned strides and data (the rank is zero-padded to a multiple of 16 bytes; an
unaligned hidden size falls back to another backend), contiguous gradients, and no rows past the last group
(all T*K rows are real, so nothing is left uninitialised).
"""

from __future__ import annotations

import functools

import torch

from . import Activation, register_backend
from .dense import dense_routed
from .sorting import pad_rank, sort_pairs_by_expert, sorting_pays_off, sum_pairs_per_token

_ALIGN_BYTES = 16


def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` where it exists (torch >= 2.10), else the older ``torch._grouped_mm``."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return grouped(mat_a, mat_b, offs=offsets)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when contiguous and 16-byte aligned (what grouped_mm requires), else an aligned copy."""
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGN_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class GroupedLinear(torch.autograd.Function):
    """Rows sorted by expert (S, in) times their expert's weight (N, out, in) transposed, with a backward that
    hands grouped_mm only the layouts it accepts (contiguous gradients, aligned strides)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor):
        ctx.save_for_backward(rows, weight, offsets, empty)
        return _grouped_mm(rows, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rows, weight, offsets, empty = ctx.saved_tensors
        grad_output = aligned(grad_output)
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = _grouped_mm(grad_output, weight, offsets)
        if ctx.needs_input_grad[1]:
            # Experts that got no rows have an empty contraction; make their gradient an explicit zero.
            grad_weight = _grouped_mm(grad_output.t(), rows, offsets).masked_fill_(empty, 0)
        return grad_rows, grad_weight, None, None


def grouped_mm_routed(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Sort pairs by expert, run both projections as grouped GEMMs, and add each pair back into its token.

    The routing weight scales the r-wide bottleneck rather than the D-wide output (B is linear), which is
    cheaper and gives the weight's gradient from the same r-wide product.
    """
    num_tokens, top_k = expert_index.shape
    if num_tokens * top_k == 0:
        return dense_routed(hidden, lora_A, lora_B, expert_index, expert_weight, activation)
    lora_A, lora_B = pad_rank(lora_A, lora_B, _ALIGN_BYTES // lora_A.element_size())
    pairs = sort_pairs_by_expert(expert_index, lora_A.shape[0])
    rows = hidden.index_select(0, pairs.token)
    down = GroupedLinear.apply(rows, aligned(lora_A), pairs.offsets, pairs.empty)
    if activation is not None:
        down = activation(down)
    pair_weight = expert_weight.reshape(-1).index_select(0, pairs.order).to(down.dtype)
    up = GroupedLinear.apply(down * pair_weight.unsqueeze(-1), aligned(lora_B), pairs.offsets, pairs.empty)
    return sum_pairs_per_token(up, pairs, num_tokens)


@functools.cache
def kernel_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped_mm kernel for the device and dtype (probed once on a tiny problem)."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    device = torch.device(device_type)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        rows = torch.ones(4, 8, device=device, dtype=dtype)
        weight = torch.ones(2, 8, 8, device=device, dtype=dtype)
        offsets = torch.tensor([1, 4], device=device, dtype=torch.int32)
        result = _grouped_mm(rows, weight.transpose(1, 2), offsets)
    except (RuntimeError, NotImplementedError):
        return False
    return bool((result == 8).all())


def _supports(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """Eager mode, matching dtypes, an aligned hidden size and a kernel for the device and dtype."""
    if torch.compiler.is_compiling() or hidden.dtype != lora_A.dtype:
        return False
    if lora_A.shape[2] * lora_A.element_size() % _ALIGN_BYTES:
        return False
    return kernel_runs(hidden.device.type, hidden.dtype)


def _refuses(hidden_size: int, dtype: torch.dtype) -> str | None:
    """grouped_mm reads rows of the hidden size: they must be 16-byte aligned (the rank is padded, it cannot be)."""
    row_bytes = hidden_size * dtype.itemsize
    if row_bytes % _ALIGN_BYTES:
        return (
            f"grouped_mm needs rows aligned to {_ALIGN_BYTES} bytes, and a row of hidden size {hidden_size} in "
            f"{dtype} is {row_bytes} bytes"
        )
    return None


def _preferred(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
    """Worth sorting: enough tokens, and the dense backend would spend most of its work on unselected experts."""
    return sorting_pays_off(hidden, lora_A, expert_index)


register_backend("grouped_mm", grouped_mm_routed, _supports, priority=20, preferred=_preferred, refuses=_refuses)
