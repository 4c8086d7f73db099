"""Interchangeable backends that compute routed and always-active adapter experts.

Every backend computes, for tokens ``h`` (T x D), stacked experts ``A`` (N x r x D) and ``B`` (N x D x r),
and a routing given as expert indices and weights (T x K)::

    out[t] = sum_k weight[t, k] * B[index[t, k]] @ act(A[index[t, k]] @ h[t])

Backends differ only in speed and in where they can run; all are dropless (no capacity limit, no token
dropped) and agree in output and gradients. ``auto`` (the default) picks the fastest correct one for the
device, dtype and shape; naming a backend forces it. Backends register themselves here, as Transformers'
experts implementations do in ``integrations/moe.py``:

* ``megablocks`` (CUDA, bf16, optional extra): MegaBlocks' sort, histogram, cumsum, gather, scatter and
  grouped GEMM.
* ``grouped_mm``: PyTorch's grouped GEMM over (token, expert) pairs sorted by expert; pays off when N * r / K is
  large (the dense backend then wastes most of its work on unselected experts). All its shapes are static, so it is
  also what ``auto`` takes under ``torch.compile`` for every call bigger than a decode step.
* ``gather``: gathers the selected experts' weights and runs two batched matmuls; no sorting, for decode-sized
  token counts.
* ``dense``: every token through every expert, unselected ones weighted 0; tiny shapes and old torch (compiled,
  only where ``grouped_mm`` cannot run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Activation = Callable[[torch.Tensor], torch.Tensor] | None
RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Activation], torch.Tensor]
SupportFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]
RefusalFn = Callable[[int, torch.dtype], str | None]


@dataclass(frozen=True)
class DispatchBackend:
    """A routed-adapter implementation and the test that says whether it can run on given inputs.

    ``preferred`` (optional) says whether ``auto`` should pick this backend for a call it supports, i.e. whether
    it is expected to be the fastest there; ``None`` means always. ``refuses`` (optional) gives, from the hidden
    size and the adapter's dtype alone, why the backend can never run such an adapter (None where it may), so that
    a backend named in the config is refused when the adapter is made rather than at its first step.
    """

    name: str
    routed: RoutedFn
    supports: SupportFn
    priority: int
    preferred: SupportFn | None = None
    refuses: RefusalFn | None = None

    def suits(self, hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> bool:
        """Whether ``auto`` takes this backend for these inputs: it can run them and is worth it there."""
        if not self.supports(hidden, lora_A, expert_index):
            return False
        return self.preferred is None or self.preferred(hidden, lora_A, expert_index)


_BACKENDS: dict[str, DispatchBackend] = {}
_BY_PRIORITY: list[DispatchBackend] = []
_AUTO_CHOICES: dict[tuple, DispatchBackend] = {}
"""``auto``'s choice per call signature: the same decode step repeats every token, and asking every backend
again costs more than a small kernel. Emptied when it reaches ``_MAX_REMEMBERED`` signatures, since training
on unpadded batches brings a new token count almost every step."""
_MAX_REMEMBERED = 4096


def register_backend(
    name: str,
    routed: RoutedFn,
    supports: SupportFn,
    priority: int,
    preferred: SupportFn | None = None,
    refuses: RefusalFn | None = None,
) -> None:
    """Register a backend; ``auto`` tries backends by descending priority and takes the first that suits the call."""
    _BACKENDS[name] = DispatchBackend(
        name=name, routed=routed, supports=supports, priority=priority, preferred=preferred, refuses=refuses
    )
    _BY_PRIORITY[:] = sorted(_BACKENDS.values(), key=lambda candidate: -candidate.priority)
    _AUTO_CHOICES.clear()


def available_backends() -> list[str]:
    """Names that ``PerftConfig(dispatch_backend=...)`` accepts, besides ``auto``."""
    return sorted(_BACKENDS)


def refusal(name: str, hidden_size: int, dtype: torch.dtype) -> str | None:
    """Why the named backend can never run an adapter of this hidden size and dtype; None for ``auto`` (it falls
    back) and where the backend may run it (whether it does also depends on the device, known only at the call)."""
    backend = _BACKENDS.get(name)
    return None if backend is None or backend.refuses is None else backend.refuses(hidden_size, dtype)


def select_backend(
    name: str, hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor
) -> DispatchBackend:
    """Resolve ``name`` (or ``auto``) to a backend that can run on these inputs."""
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"Unknown dispatch backend {name!r}; choose 'auto' or one of {sorted(_BACKENDS)}.")
        backend = _BACKENDS[name]
        if not backend.supports(hidden, lora_A, expert_index):
            raise RuntimeError(
                f"Dispatch backend {name!r} cannot run on {hidden.device.type} with dtype {hidden.dtype} and rank "
                f"{lora_A.shape[1]}; use dispatch_backend='auto' to fall back to one that can."
            )
        return backend
    if torch.compiler.is_compiling():
        return _first_suiting(hidden, lora_A, expert_index)
    key = _call_signature(hidden, lora_A, expert_index)
    chosen = _AUTO_CHOICES.get(key)
    if chosen is None:
        if len(_AUTO_CHOICES) >= _MAX_REMEMBERED:
            _AUTO_CHOICES.clear()
        chosen = _AUTO_CHOICES[key] = _first_suiting(hidden, lora_A, expert_index)
    return chosen


def _first_suiting(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> DispatchBackend:
    for backend in _BY_PRIORITY:
        if backend.suits(hidden, lora_A, expert_index):
            return backend
    raise RuntimeError("No dispatch backend supports these inputs; this is a bug, please report it.")


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the call where the dtype already matches: on a decode step the no-op ``to``
    calls of a block cost several microseconds each, which is what PERFT's whole adapter term costs."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def needs_gradients(hidden: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether this call will be differentiated: the cost models for training and inference differ."""
    return torch.is_grad_enabled() and (hidden.requires_grad or lora_A.requires_grad)


def _call_signature(hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor) -> tuple:
    """Everything a backend's ``supports`` and ``preferred`` may look at: devices, dtypes, shapes, grad mode."""
    differentiable = needs_gradients(hidden, lora_A)
    return (hidden.device, hidden.dtype, lora_A.dtype, lora_A.shape, expert_index.shape, differentiable)


def routed_experts(
    hidden: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    activation: Activation = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum of the selected bottleneck experts for every token (see the module docstring)."""
    chosen = select_backend(backend, hidden, lora_A, expert_index)
    return chosen.routed(hidden, lora_A, lora_B, expert_index, expert_weight, activation)


def always_on_experts(
    hidden: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, activation: Activation = None
) -> torch.Tensor:
    """Sum of all N experts for every token (PERFT-D and -S) as one matmul pair over the stacked experts."""
    num_experts, rank, hidden_dim = lora_A.shape
    down = hidden @ lora_A.reshape(num_experts * rank, hidden_dim).t()
    if activation is not None:
        down = activation(down)
    up_weight = lora_B.permute(1, 0, 2).reshape(hidden_dim, num_experts * rank)
    return down @ up_weight.t()


def add_scaled(output: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """``output + scaling * delta``: one kernel in eager mode (``torch.add``'s ``alpha``), written out under
    ``torch.compile``, where Inductor (seen with torch 2.13 on CPU) rewrites ``add(x, mm(a, b), alpha=s)`` into
    ``addmm(x, a, b)`` and silently drops ``s``; the written-out form compiles into one fused kernel as well."""
    if torch.compiler.is_compiling():
        return output + delta * scaling
    return torch.add(output, delta, alpha=scaling)


# The built-in backends register themselves on import (MegaBlocks itself is imported only when first used).
from . import dense, gather, grouped, megablocks_backend  # noqa: E402, F401
