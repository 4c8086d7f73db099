"""Find the MoE blocks of a model by their structure: a router beside an experts module.

Transformers 5 gives MoE blocks one shape: a router whose weight is (num_experts, hidden) and an experts module
holding fused 3-D weights (num_experts, ...) whose forward receives ``(hidden_states, top_k_index,
top_k_weights)``. Detection relies on that shape, not on class names, so that new models work unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoeBlockSpec:
    """What PERFT needs to know about one MoE block."""

    hidden_size: int
    num_experts: int
    top_k: int | None
    router_name: str
    experts_name: str
    experts_call_parameters: tuple[str, ...]

    @property
    def experts_routable(self) -> bool:
        """Whether the experts' call carries (hidden_states, indices, weights), which PERFT-E needs."""
        return len(self.experts_call_parameters) >= 3

    def experts_module(self, block: nn.Module) -> nn.Module:
        """The block's experts module, whose call carries the routing that PERFT-E reuses."""
        return getattr(block, self.experts_name)

    def read_experts_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden_states, expert indices, expert weights) of one call of the experts module."""
        names = self.experts_call_parameters
        values = dict(zip(names, args, strict=False))
        values.update({name: kwargs[name] for name in names if name in kwargs})
        return values[names[0]], values[names[1]], values[names[2]]


def describe_moe_block(block: nn.Module) -> MoeBlockSpec | None:
    """Return the spec of ``block`` if it is an MoE block (a router child and an experts child), else None."""
    experts = _find_experts_child(block)
    if experts is None:
        return None
    experts_name, num_experts = experts
    router = _find_router_child(block, num_experts, exclude=experts_name)
    if router is None:
        return None
    router_name, hidden_size = router
    router_module = getattr(block, router_name)
    top_k = getattr(router_module, "top_k", None) or getattr(block, "top_k", None)
    return MoeBlockSpec(
        hidden_size=hidden_size,
        num_experts=num_experts,
        top_k=top_k,
        router_name=router_name,
        experts_name=experts_name,
        experts_call_parameters=_call_parameters(getattr(block, experts_name)),
    )


def find_moe_blocks(model: nn.Module) -> dict[str, MoeBlockSpec]:
    """Map the qualified name of every MoE block in ``model`` to its spec, skipping blocks nested in another."""
    blocks: dict[str, MoeBlockSpec] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in blocks):
            continue
        spec = describe_moe_block(getattr(module, "base_layer", module))
        if spec is not None:
            blocks[name] = spec
    return blocks


def _find_experts_child(block: nn.Module) -> tuple[str, int] | None:
    """The child that directly holds 3-D parameters sharing one leading (expert) dimension."""
    for name, child in block.named_children():
        leading = {p.shape[0] for p in child.parameters(recurse=False) if p.dim() == 3}
        if len(leading) == 1 and (num_experts := leading.pop()) > 1:
            return name, num_experts
    return None


def _find_router_child(block: nn.Module, num_experts: int, exclude: str) -> tuple[str, int] | None:
    """The child whose 2-D weight has one row per expert; returns its name and the hidden size."""
    for name, child in block.named_children():
        weight = getattr(child, "weight", None)
        if name == exclude or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.shape[0] == num_experts:
            return name, weight.shape[1]
    return None


def _call_parameters(experts: nn.Module) -> tuple[str, ...]:
    """Names of the experts' forward parameters (unwrapping the experts-implementation decorator)."""
    forward = inspect.unwrap(type(experts).forward)
    parameters = inspect.signature(forward).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in positional)[1:]
