"""A pure-PyTorch stand-in for the MegaBlocks (0.10) functions that peft_perft's ``megablocks`` backend calls.

It implements exactly those functions, with MegaBlocks' semantics as its CUDA/Triton kernels and their tests
define them (databricks/megablocks: ``megablocks/ops/*.py``, ``megablocks/backend/kernels.py``, ``tests/ops``),
and it enforces the preconditions the kernels rely on but do not all check, so that a wrong call from our backend
fails here instead of silently giving garbage on a GPU:

- ``sort(x, end_bit)``: radix sort of integer ids on their low ``end_bit`` bits; (sorted values, source positions),
  both in ``x``'s dtype. Ids that need more than ``end_bit`` bits would be mis-sorted by the kernel: refused here.
- ``histogram(x, max_val)``: int32 count of each value in ``[0, max_val)``, one row per row of a 2-D input.
- ``inclusive_cumsum(x, dim)``: cumulative sum; a 1-D input is summed as one row and comes back ``squeeze()``-d,
  so a single expert gives a 0-d tensor (callers must ``view(-1)``).
- ``gather(x, indices, bin_ids, bins, top_k)``: row ``i`` of the result is token ``indices[i] // top_k`` of ``x``;
  its gradient sums the K copies of a token.
- ``scatter(x, indices, bin_ids, weights, bins, top_k)``: sorted row ``i`` times ``weights[indices[i]]`` goes to
  token ``indices[i] // top_k``, the K rows of a token summed; gradients to ``x`` and to ``weights``.
- grouped_gemm's ``gmm(a, b, batch_sizes, trans_b)`` (which MegaBlocks re-exports in ``grouped_gemm_util``): rows
  of ``a`` in consecutive groups of ``batch_sizes`` (int64, on the host), each times its expert's ``b`` (transposed
  with ``trans_b``); bf16 only, as the CUDA kernel.

``install(monkeypatch)`` makes the backend find these modules instead of MegaBlocks and records every call.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch


@dataclass
class CallLog:
    """The stand-in functions called, in order, with the arguments that matter for checking the backend."""

    calls: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def record(self, name: str, **details) -> None:
        self.calls.append((name, details))


LOG = CallLog()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"megablocks stand-in: {message}")


def sort(x: torch.Tensor, end_bit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _require(x.dim() == 1 and x.dtype in (torch.int16, torch.int32, torch.int64), "sort takes a 1-D integer tensor")
    bits = {torch.int16: 16, torch.int32: 32, torch.int64: 64}[x.dtype] if end_bit is None else end_bit
    in_range = x.numel() == 0 or (int(x.min()) >= 0 and int(x.max()) < 2**bits)
    _require(in_range, f"ids need more than end_bit={bits} bits")
    LOG.record("sort", end_bit=bits, dtype=x.dtype, size=x.numel())
    values, order = torch.sort(x, stable=True)
    return values, order.to(x.dtype)


def histogram(x: torch.Tensor, max_val: int) -> torch.Tensor:
    _require(x.dim() in (1, 2) and not x.is_floating_point(), "histogram takes a 1-D or 2-D integer tensor")
    LOG.record("histogram", max_val=max_val)
    rows = x.view(1, -1) if x.dim() == 1 else x
    counts = torch.stack([torch.bincount(row.long(), minlength=max_val)[:max_val] for row in rows])
    counts = counts.to(torch.int32)
    return counts.view(-1) if x.dim() == 1 else counts


def inclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    LOG.record("inclusive_cumsum", dim=dim, size=x.numel())
    if x.dim() == 1:
        return torch.cumsum(x.view(1, -1), dim=1).to(x.dtype).squeeze()
    return torch.cumsum(x, dim=dim).to(x.dtype)


def _check_routing(x_rows: int, indices: torch.Tensor, bin_ids: torch.Tensor, bins: torch.Tensor, top_k: int) -> None:
    _require(indices.dim() == 1 and bin_ids.dim() == 1 and bins.dim() == 1, "indices, bin_ids, bins must be 1-D")
    _require(indices.numel() == x_rows * top_k, f"{indices.numel()} indices for {x_rows} tokens x top_k {top_k}")
    _require(bin_ids.numel() == indices.numel(), "bin_ids and indices must have the same length")
    _require(int(bins.reshape(-1)[-1]) == indices.numel(), "the last bin must end at the number of pairs")


def gather(
    x: torch.Tensor, indices: torch.Tensor, bin_ids: torch.Tensor, bins: torch.Tensor, top_k: int
) -> torch.Tensor:
    _require(x.dim() == 2, "gather takes (tokens, hidden) rows")
    _check_routing(x.shape[0], indices, bin_ids, bins, top_k)
    LOG.record("gather", rows=x.shape[0], top_k=top_k, contiguous=x.is_contiguous())
    return x.index_select(0, indices.long() // top_k)


def scatter(
    x: torch.Tensor,
    indices: torch.Tensor,
    bin_ids: torch.Tensor,
    weights: torch.Tensor,
    bins: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    _require(x.dim() == 2 and x.shape[0] == indices.numel(), "scatter takes one row per sorted pair")
    _check_routing(indices.numel() // top_k, indices, bin_ids, bins, top_k)
    _require(weights.dim() == 1 and weights.numel() == indices.numel(), "one routing weight per pair")
    LOG.record("scatter", top_k=top_k, weights_dtype=weights.dtype, x_dtype=x.dtype)
    tokens = indices.numel() // top_k
    flat_position = indices.long()
    scaled = x * weights.index_select(0, flat_position).to(x.dtype).unsqueeze(-1)
    per_slot = torch.zeros(tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    per_slot = per_slot.index_copy(0, flat_position, scaled)
    return per_slot.view(tokens, top_k, -1).sum(dim=1)


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    _require(a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16, "gmm takes bf16 operands only")
    _require(a.is_contiguous() and b.is_contiguous(), "gmm takes contiguous operands")
    _require(batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64, "batch_sizes: int64 on the host")
    _require(b.dim() == 3 and batch_sizes.numel() == b.shape[0], "one batch size per expert of b (E, ., .)")
    _require(int(batch_sizes.sum()) == a.shape[0], "batch sizes must add up to the rows of a")
    LOG.record("gmm", a_shape=tuple(a.shape), b_shape=tuple(b.shape), trans_b=trans_b)
    pieces = [
        rows @ (weight.t() if trans_b else weight)
        for rows, weight in zip(a.split(batch_sizes.tolist()), b.unbind(0), strict=True)
    ]
    return torch.cat(pieces) if pieces else a.new_zeros(0, b.shape[1] if trans_b else b.shape[2])


def modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(megablocks.ops, grouped_gemm ops)`` as the backend's ``_megablocks()`` returns them."""
    ops = types.ModuleType("megablocks.ops (stand-in)")
    ops.sort, ops.histogram, ops.inclusive_cumsum, ops.gather, ops.scatter = (
        sort,
        histogram,
        inclusive_cumsum,
        gather,
        scatter,
    )
    grouped_gemm = types.ModuleType("grouped_gemm.ops (stand-in)")
    grouped_gemm.gmm = gmm
    return ops, grouped_gemm
