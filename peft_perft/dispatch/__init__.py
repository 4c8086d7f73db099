"""Interchangeable backends that compute routed and always-active adapter experts.

Every backend computes, for tokens ``h`` (T x D), stacked experts ``A`` (N x r x D) and ``B`` (N x D x r),
and a routing given as expert indices and weights (T x K)::

    out[t] = sum_k weight[t, k] * B[index[t, k]] @ act(A[index[t, k]] @ h[t])

Backends differ only in speed and in where they can run; all are dropless and must agree with
``reference`` in output and gradients. ``auto`` (the default) picks the fastest correct one for
the device, dtype and shape. Backends register themselves here, as Transformers' experts
implementations do in ``integrations/moe.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Activation = Callable[[torch.Tensor], torch.Tensor] | None
RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Activation], torch.Tensor]
SupportFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]


@dataclass(frozen=True)
class DispatchBackend:
    """A routed-adapter implementation and the test that says whether it can run on given inputs."""

    name: str
    routed: RoutedFn
    supports: SupportFn
    priority: int


_BACKENDS: dict[str, DispatchBackend] = {}


def register_backend(name: str, routed: RoutedFn, supports: SupportFn, priority: int) -> None:
    """Register a backend; ``auto`` tries backends by descending priority and takes the first that supports the call."""
    _BACKENDS[name] = DispatchBackend(name=name, routed=routed, supports=supports, priority=priority)


def available_backends() -> list[str]:
    """Names that ``PerftConfig(dispatch_backend=...)`` accepts, besides ``auto``."""
    _load_builtin_backends()
    return sorted(_BACKENDS)


def select_backend(
    name: str, hidden: torch.Tensor, lora_A: torch.Tensor, expert_index: torch.Tensor
) -> DispatchBackend:
    """Resolve ``name`` (or ``auto``) to a backend that can run on these inputs."""
    _load_builtin_backends()
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
    for backend in sorted(_BACKENDS.values(), key=lambda candidate: -candidate.priority):
        if backend.supports(hidden, lora_A, expert_index):
            return backend
    raise RuntimeError("No dispatch backend supports these inputs; this is a bug, please report it.")


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


def _load_builtin_backends() -> None:
    """Import the backend modules once so that they register themselves."""
    from . import dense  # noqa: F401
