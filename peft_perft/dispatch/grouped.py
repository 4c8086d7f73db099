"""``grouped_mm`` backend: PyTorch's native grouped GEMM over the routing's pairs sorted by expert.

Each selected (token, expert) pair costs 2 * r * D multiply-adds instead of the dense backend's 2 * N * r * D per
token, at the price of a sort, a gather of T*K rows and a scatter back. The kernel's rules are kept here:
int32 group ends, 16-byte aligned strides and data (the rank is zero-padded to a multiple of 16 bytes; an
unaligned hidden size falls back to another backend), contiguous gradients, and no rows past the last group
(all T*K rows are real, so nothing is left uninitialised).

Every shape on this path is static (T*K sorted pairs, N group ends from ``searchsorted``), so it also runs under
``torch.compile(fullgraph=True)`` without a graph break or a host read. There the kernel is called through the
custom operator ``peft_perft::grouped_mm``: torch's own fake (meta) kernel for ``_grouped_mm`` accepts bf16 only
(torch 2.13), while the eager kernel also runs fp32 and fp16 on CPU and where the device has it; the operator is
opaque to the compiler and makes its operands kernel-ready (aligned) itself, as the compiler's buffers are not
checked for alignment.
"""

from __future__ import annotations

import functools

import torch

from . import Activation, register_backend
from .dense import dense_routed
from .gather import decode_sized
from .sorting import pad_rank, sort_pairs_by_expert, sorting_pays_off, sum_pairs_per_token

_ALIGN_BYTES = 16


def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` where it exists (torch >= 2.10), else the older ``torch._grouped_mm``."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return grouped(mat_a, mat_b, offs=offsets)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when contiguous and 16-byte aligned (what grouped_mm requires), else an aligned copy.

    Under ``torch.compile`` the tensor itself: there is no address to check while tracing, and
    ``peft_perft::grouped_mm`` aligns its operands when it runs."""
    if torch.compiler.is_compiling():
        return tensor
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGN_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _kernel_ready(tensor: torch.Tensor) -> torch.Tensor:
    """The operand itself where grouped_mm takes it (16-byte aligned data, unit stride in one of the last two
    dimensions and 16-byte multiples for the others: a row-major matrix or a transposed view of one), else an
    aligned contiguous copy."""
    unit = tensor.stride(-1) == 1 or tensor.stride(-2) == 1
    strides_aligned = all(
        stride * tensor.element_size() % _ALIGN_BYTES == 0 for stride in tensor.stride() if stride != 1
    )
    if unit and strides_aligned and tensor.data_ptr() % _ALIGN_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("peft_perft::grouped_mm", mutates_args=())
def compiled_grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM as one opaque operator for ``torch.compile``: (S, k) x (N, k, n) -> (S, n) with the
    rows grouped by ``offsets``, or (m, S) x (S, n) -> (N, m, n) with the contraction grouped (a weight gradient).

    Its kernel reads the group ends on the device (CUDA) or in its own loop (CPU); nothing in the compiled graph
    reads them back to the host."""
    return _grouped_mm(_kernel_ready(mat_a), _kernel_ready(mat_b), offsets)


@compiled_grouped_mm.register_fake
def _grouped_mm_shape(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The output's shape from the operands' alone: static, whatever the routing."""
    if mat_b.dim() == 3:
        return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])
    return mat_a.new_empty(offsets.shape[0], mat_a.shape[0], mat_b.shape[-1])


def grouped_matmul(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm on kernel-ready operands: the native call in eager mode, the custom operator under compile."""
    if torch.compiler.is_compiling():
        return compiled_grouped_mm(mat_a, mat_b, offsets)
    return _grouped_mm(mat_a, mat_b, offsets)


class GroupedLinear(torch.autograd.Function):
    """Rows sorted by expert (S, in) times their expert's weight (N, out, in) transposed, with a backward that
    hands grouped_mm only the layouts it accepts (contiguous gradients, aligned strides)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor):
        ctx.save_for_backward(rows, weight, offsets, empty)
        return grouped_matmul(rows, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rows, weight, offsets, empty = ctx.saved_tensors
        grad_output = aligned(grad_output)
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = grouped_matmul(grad_output, weight, offsets)
        if ctx.needs_input_grad[1]:
            # Experts that got no rows have an empty contraction; make their gradient an explicit zero.
            grad_weight = grouped_matmul(grad_output.t(), rows, offsets).masked_fill_(empty, 0)
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


@torch.compiler.assume_constant_result
def kernel_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped_mm kernel for the device and dtype; a constant for ``torch.compile``,
    which calls the probe while tracing instead of tracing it."""
    return _probe_kernel(device_type, dtype)


@functools.cache
def _probe_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Run grouped_mm once on a tiny problem of this device and dtype."""
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
    """Matching dtypes, an aligned hidden size and a kernel for the device and dtype (eager or compiled)."""
    if hidden.dtype != lora_A.dtype:
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
    """Eager: worth sorting (enough tokens, and the dense backend would spend most of its work on unselected
    experts). Compiled: every call bigger than a decode step (those go to ``gather``), so that the compiled
    step's adapter FLOPs follow the routed pairs, not all N experts, wherever it runs; the eager cost model was
    fitted to uncompiled kernels on one CPU and says nothing about compiled code (BENCHMARKS.md)."""
    if torch.compiler.is_compiling():
        return not decode_sized(lora_A.shape[0], expert_index)
    return sorting_pays_off(hidden, lora_A, expert_index)


register_backend("grouped_mm", grouped_mm_routed, _supports, priority=20, preferred=_preferred, refuses=_refuses)
