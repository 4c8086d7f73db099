"""Find the MoE blocks of a model by their structure: a router beside an experts module.

Transformers 5 gives MoE blocks one shape: a router with one output row per expert and an experts module holding
stacked expert weights (num_experts, ...) whose forward receives ``(hidden_states, top_k_index, top_k_weights)``.
Detection relies on that shape, not on class names, so that new models with the common shape work unchanged:

- the experts module is a child with 3-D parameters sharing an expert dimension (convolution weights are not
  experts), or, for experts stored as 2-D stacks (DBRX), a child that declares ``num_experts``;
- the router is another child holding a 2-D weight with one row per expert, possibly nested (``router.layer``,
  ``gate.wg``, a router MLP) and possibly with extra rows for zero-compute or shared experts (LongCat, Inkling);
- a block that is a whole decoder layer (router and experts beside the attention, as in Gemma 4) is adapted at
  its experts module, which is the MoE computation of that layer.

Shapes are read as the model's math sees them, not as the storage holds them (`logical_shape`): bitsandbytes packs
4-bit Linear weights into (rows * cols / 2, 1) bytes, DeepSpeed ZeRO-3 leaves (0,)-shaped placeholders, FP4 experts
hold two values per byte; DTensors and the quantized tensor subclasses of torchao and quanto already report their
logical shape. Each block's hidden size is then checked against the model's config, so a misread storage is an
error naming the block, never an adapter of the wrong width.

``BLOCK_HINTS`` covers the few blocks whose structure is not enough on its own; ``ROUTER_OUTPUT_ROUTING`` the routers
whose output carries the routing when the experts' call does not (Llama 4, JetMoE, Switch Transformers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ROUTER_EXTRA_ROWS = 2.0
"""A router may have up to this factor more rows than experts (zero-compute, sink or shared-expert logits)."""

PACKED_FP4_STORAGE = torch.uint8
"""Storage dtype of 4-bit expert weights packed two values per byte (MXFP4, NVFP4, int4); 8-bit formats store one
value per element (int8, float8), and tensor subclasses (torchao, quanto) report their logical shape themselves."""

RouterRouting = Callable[[object, int], tuple[torch.Tensor, torch.Tensor]]
"""Reads (expert indices (T, K), expert weights (T, K)) from a router's output, given the block's top-k."""


@dataclass(frozen=True)
class MoeBlockSpec:
    """What PERFT needs to know about one MoE block.

    ``experts_name`` is the block's child that computes the routed experts ("" when the adapted block is the experts
    module itself, None when the experts are not a module that receives the routing). ``num_experts`` counts the
    experts that have weights; ``routing_slots`` the router's rows, whose slots beyond ``num_experts``
    (zero-compute or skip experts) carry no PERFT-E adapter.
    """

    hidden_size: int
    num_experts: int
    top_k: int | None
    router_name: str
    experts_name: str | None
    experts_call_parameters: tuple[str, ...]
    experts_hidden_size: int | None = None
    routing_slots: int | None = None
    router_routing: RouterRouting | None = None

    @property
    def routes_from_router(self) -> bool:
        """Whether PERFT-E reads the routing from the router's output (the experts' call does not carry it)."""
        return self.router_routing is not None and self.top_k is not None

    @property
    def has_skip_slots(self) -> bool:
        """Whether the router has rows past the weighted experts (or their count is unknown), so that some routing
        slots may point at zero-compute or skip experts."""
        return self.routing_slots is None or self.routing_slots > self.num_experts

    @property
    def experts_routable(self) -> bool:
        """Whether the experts' call carries (hidden_states, indices, weights), which PERFT-E needs."""
        if self.routes_from_router:
            return True
        same_width = self.experts_hidden_size in (None, self.hidden_size)
        return self.experts_name is not None and len(self.experts_call_parameters) >= 3 and same_width

    @property
    def why_not_routable(self) -> str:
        """Why PERFT-E cannot reuse this block's routing (for error messages)."""
        if self.experts_name is None:
            return "its experts are computed inline, not by an experts module that receives the routing"
        if self.experts_hidden_size not in (None, self.hidden_size):
            return (
                f"its experts work at width {self.experts_hidden_size} behind a latent projection, not at the "
                f"block's hidden size {self.hidden_size}"
            )
        return f"its experts module {self.experts_name!r} is not called with the routed indices and weights"

    def experts_module(self, block: nn.Module) -> nn.Module:
        """The block's experts module, whose call carries the routing that PERFT-E reuses."""
        if self.experts_name is None:
            raise ValueError(f"{type(block).__name__} has no experts module that receives the model's routing.")
        return block.get_submodule(self.experts_name)

    def read_experts_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden_states (T, D), expert indices (T, K), expert weights (T, K)) of one call of the experts module.

        Slots routed past the weighted experts (LongCat's identity experts, ZAYA's skip slot) come back with
        index 0 and weight 0, so they add no adapter output.
        """
        if len(args) >= 3:
            hidden, index, weight = args[:3]
        else:
            values = {**dict(zip(self.experts_call_parameters, args, strict=False)), **kwargs}
            hidden, index, weight = (values[name] for name in self.experts_call_parameters[:3])
        index, weight = index.reshape(-1, index.shape[-1]), weight.reshape(-1, index.shape[-1])
        if not self.has_skip_slots:
            return hidden.reshape(-1, hidden.shape[-1]), index, weight
        weighted = index < self.num_experts
        index = torch.where(weighted, index, torch.zeros_like(index))
        weight = torch.where(weighted, weight, torch.zeros_like(weight))
        return hidden.reshape(-1, hidden.shape[-1]), index, weight


@dataclass(frozen=True)
class BlockHint:
    """Names for a block whose structure alone does not identify its router and experts.

    ``adapt=False`` marks a module that looks like an MoE block but is not a feed-forward one (``reason`` says why).
    """

    router: str | None = None
    experts: str | None = None
    adapt: bool = True
    reason: str = ""


BLOCK_HINTS: dict[str, BlockHint] = {
    # JetMoE's mixture of attention heads: routed like an MoE but part of attention, run through map()/reduce().
    "JetMoeMoA": BlockHint(adapt=False, reason="mixture-of-attention-heads inside the attention, not an FFN block"),
    # Doge's CDMoE: product-key routing over embedding-row experts computed inline, no experts module to hook.
    "DogeCDMoE": BlockHint(router="router_gate", experts=None),
}


def _llama4_router_routing(output: tuple[torch.Tensor, torch.Tensor], top_k: int) -> tuple[torch.Tensor, ...]:
    """Llama 4's router returns (scores (T, N), logits (T, N)): the top-k of the logits, whose sigmoid the scores
    hold there (0 elsewhere). The block multiplies those scores into the experts' input."""
    scores, logits = output
    index = logits.topk(top_k, dim=-1).indices
    return index, scores.gather(1, index)


def _jetmoe_router_routing(output: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JetMoE's router returns its (token, slot) pairs sorted by expert: their flat positions, tokens, gates,
    per-expert counts and the logits. Scattering the sorted pairs back gives (indices, gates) per token and slot."""
    sorted_positions, _, sorted_gates, expert_sizes, _ = output
    counts = torch.tensor(expert_sizes, device=sorted_positions.device)
    sorted_experts = torch.arange(len(expert_sizes), device=sorted_positions.device).repeat_interleave(counts)
    index = torch.empty_like(sorted_positions).scatter(0, sorted_positions, sorted_experts)
    weight = torch.empty_like(sorted_gates).scatter(0, sorted_positions, sorted_gates)
    return index.view(-1, top_k), weight.view(-1, top_k)


def _switch_router_routing(output: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformers' top-1 router returns (one-hot expert mask (B, S, N), top probability (B, S, 1), logits);
    its experts get that mask, not indices. A token past its expert's capacity has an all-zero mask and skips the
    experts, so it gets weight 0 here."""
    mask, probability, _ = output
    index = mask.argmax(dim=-1).reshape(-1, top_k)
    weight = probability.squeeze(-1) * mask.sum(dim=-1).to(probability.dtype)
    return index, weight.reshape(-1, top_k)


ROUTER_OUTPUT_ROUTING: dict[str, RouterRouting] = {
    "Llama4Router": _llama4_router_routing,
    "JetMoeTopKGating": _jetmoe_router_routing,
    "SwitchTransformersTop1Router": _switch_router_routing,
}
"""Routers (by class) whose output gives PERFT-E the routing that their block's experts call does not carry."""

ROUTER_TOP_K: dict[str, int] = {"SwitchTransformersTop1Router": 1}
"""Routers (by class) whose top-k is fixed by design rather than stored on the router or its block."""

TokenSelector = Callable[[torch.Tensor], torch.Tensor]
"""From per-token type ids (batch, positions), the bool mask of the tokens one expert group receives."""


@dataclass(frozen=True)
class TokenGroups:
    """A layer whose tokens are split among expert groups, each its own MoE block with its own router and experts.

    Each group block sees only its tokens, flattened in (batch, position) order, so its routing rows pair with
    tokens only through the split. ``type_ids`` names the argument of the layer's block that carries the per-token
    type ids (absent: every id 0), ``members`` the group blocks (children) and the tokens each one receives.
    """

    type_ids: str
    members: dict[str, TokenSelector]

    def masks(self, block: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Per group child, the flat bool mask of the tokens of one call of ``block`` that it receives."""
        bound = inspect.signature(block.forward).bind(*args, **kwargs).arguments
        hidden_states = next(iter(bound.values()))
        type_ids = bound.get(self.type_ids)
        if type_ids is None:
            type_ids = torch.zeros(hidden_states.shape[:-1], dtype=torch.long, device=hidden_states.device)
        return {child: select(type_ids).reshape(-1) for child, select in self.members.items()}


TOKEN_GROUPS: dict[str, TokenGroups] = {
    # ERNIE-4.5-VL: text tokens (type 0) to the text experts, image and video tokens (1, 2) to the vision experts.
    "Ernie4_5_VLMoeMoeBlock": TokenGroups(
        "moe_mm_token_type_ids", {"text_moe": lambda ids: ids == 0, "vision_moe": lambda ids: ids != 0}
    ),
}
"""Layer blocks (by class) that hand each token to one of several expert groups, each adapted as its own block."""


def token_groups(module: nn.Module) -> TokenGroups | None:
    """How ``module`` splits its tokens among expert-group children, or None when it does not."""
    return TOKEN_GROUPS.get(type(_unwrapped(module)).__name__)


WHOLE_SHAPE_ATTRIBUTE = "perft_whole_shape"
"""Set on a plain tensor that holds one rank's rows of a larger adapter tensor (selective PERFT-E under expert
parallelism, whose ranks hold unequal row counts): the whole tensor's shape."""


def global_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, also on one rank's share of it: a DeepSpeed ZeRO-3 parameter is an empty
    placeholder outside the forward of its module and keeps the real shape in ``ds_shape``; a DTensor reports its
    global shape as ``shape`` already; selective PERFT-E's rows of a rank carry ``WHOLE_SHAPE_ATTRIBUTE``."""
    ds_shape = getattr(tensor, "ds_shape", None) or getattr(tensor, WHOLE_SHAPE_ATTRIBUTE, None)
    return torch.Size(ds_shape) if ds_shape is not None else tensor.shape


def logical_shape(module: nn.Module, name: str, parameter: torch.Tensor) -> torch.Size:
    """The shape of ``module``'s parameter ``name`` in the model's math, whatever its storage.

    DeepSpeed ZeRO-3 placeholders keep the real shape in ``ds_shape``; bitsandbytes 4-bit weights in their
    ``quant_state``; other Linear layers (8-bit, packed) declare ``in_features`` / ``out_features``. DTensors and
    torchao / quanto tensor subclasses report their logical (global, unquantized) shape as ``shape`` already.
    """
    if getattr(parameter, "ds_shape", None) is not None:
        return global_shape(parameter)
    quantized_shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    if quantized_shape is not None:
        return torch.Size(quantized_shape)
    features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if name == "weight" and all(isinstance(size, int) for size in features):
        return torch.Size(features)
    return parameter.shape


def _shapes(module: nn.Module, recurse: bool = True) -> Iterator[tuple[torch.Size, torch.Tensor]]:
    """(logical shape, stored tensor) of each parameter of ``module`` (and of its submodules if ``recurse``)."""
    modules = module.modules() if recurse else (module,)
    for owner in modules:
        for name, parameter in owner.named_parameters(recurse=False):
            yield logical_shape(owner, name, parameter), parameter


def describe_moe_block(block: nn.Module) -> MoeBlockSpec | None:
    """Return the spec of ``block`` if it is an MoE block (a router child and an experts child), else None."""
    found = _locate(block)
    return found[1] if found is not None and found[0] == "" else None


def find_moe_blocks(model: nn.Module) -> dict[str, MoeBlockSpec]:
    """Map the qualified name of every MoE block in ``model`` to its spec, skipping blocks nested in another.

    Raises ValueError if a block's hidden size differs from the hidden size of the model's (text) config.
    """
    blocks: dict[str, MoeBlockSpec] = {}
    for name, module in model.named_modules():
        if any(name == outer or name.startswith(f"{outer}.") for outer in blocks):
            continue
        found = _locate(_unwrapped(module))
        if found is not None:
            relative, spec = found
            blocks[".".join(part for part in (name, relative) if part)] = spec
    _check_hidden_sizes(model, blocks)
    return blocks


def _check_hidden_sizes(model: nn.Module, blocks: dict[str, MoeBlockSpec]) -> None:
    """Refuse a block whose detected hidden size is none of the model's: its adapters would have the wrong width.

    A block may sit in any tower of a composite model (dots.3's vision encoder has MoE layers of its own width), so
    the widths of the text config and of every sub-config count."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "hidden_size", None)
    if not isinstance(expected, int):
        return
    widths = {expected} | _tower_widths(config)
    for name, spec in blocks.items():
        if spec.hidden_size not in widths:
            raise ValueError(
                f"MoE block {name!r} was detected with hidden size {spec.hidden_size}, but the model's config has "
                f"hidden_size={expected} (towers: {sorted(widths - {expected})}): its router's weight is stored in a "
                f"layout PERFT does not recognise (packed or sharded). Report the block class and the quantizer or "
                f"engine that stored it; PERFT will not build adapters of the wrong width."
            )


def _tower_widths(config: object) -> set[int]:
    """The hidden sizes of every sub-config (vision, audio, talker, ...) of a composite config, nested ones too."""
    widths = set()
    keys = {**(getattr(config, "sub_configs", None) or {}), **(getattr(config, "sub_configs_defaults", None) or {})}
    for key in keys:
        sub_config = getattr(config, key, None)
        if sub_config is not None:
            width = getattr(sub_config, "hidden_size", None)
            widths |= ({width} if isinstance(width, int) else set()) | _tower_widths(sub_config)
    return widths


def _locate(module: nn.Module) -> tuple[str, MoeBlockSpec] | None:
    """(path of the module to adapt relative to ``module``, its spec) if ``module`` holds an MoE block here."""
    hint = BLOCK_HINTS.get(type(module).__name__)
    if hint is not None:
        return ("", _spec_from_hint(module, hint)) if hint.adapt else None
    experts = _find_experts_child(module)
    if experts is None:
        return None
    experts_name, num_experts = experts
    router = _find_router_child(module, num_experts, exclude=experts_name)
    if router is None:
        return None
    router_name, hidden_size = router
    if _is_decoder_layer(module):
        spec = _spec(module, hidden_size, num_experts, router_name, experts_name, experts_is_block=True)
        return experts_name, spec
    return "", _spec(module, hidden_size, num_experts, router_name, experts_name, experts_is_block=False)


def _spec(
    block: nn.Module, hidden_size: int, num_experts: int, router_name: str, experts_name: str, experts_is_block: bool
) -> MoeBlockSpec:
    experts = _unwrapped(block.get_submodule(experts_name))
    router = block.get_submodule(router_name)
    return MoeBlockSpec(
        hidden_size=hidden_size,
        num_experts=num_experts,
        routing_slots=max(_router_rows(_unwrapped(router), num_experts)),
        top_k=_top_k(router, block),
        router_name=router_name,
        experts_name="" if experts_is_block else experts_name,
        experts_call_parameters=_call_parameters(experts),
        experts_hidden_size=_experts_input_width(experts, hidden_size),
        router_routing=ROUTER_OUTPUT_ROUTING.get(type(_unwrapped(router)).__name__),
    )


def _experts_input_width(experts: nn.Module, hidden_size: int) -> int | None:
    """Input width of experts that follow Transformers' experts interface (which says whether weights are
    transposed): the width PERFT-E's adapters would see. None when the layout is not declared.

    A weight stored two 4-bit values per byte holds half its logical width along the packed (last) dimension."""
    transposed = getattr(experts, "is_transposed", None)
    found = next(((shape, p) for shape, p in _shapes(experts, recurse=False) if len(shape) == 3), None)
    if not isinstance(transposed, bool) or found is None:
        return None
    shape, weight = found
    width = shape[1] if transposed else shape[2]
    packed = weight.dtype == PACKED_FP4_STORAGE and type(weight) in (torch.Tensor, nn.Parameter)
    return 2 * width if packed and not transposed and 2 * width == hidden_size else width


def _spec_from_hint(block: nn.Module, hint: BlockHint) -> MoeBlockSpec:
    """Spec of a hinted block: sizes from the named router, the expert count from the block."""
    router = block.get_submodule(hint.router)
    rows, hidden_size = _first_matrix_shape(router)
    experts = _unwrapped(block.get_submodule(hint.experts)) if hint.experts is not None else None
    return MoeBlockSpec(
        hidden_size=hidden_size,
        num_experts=int(getattr(block, "num_experts", rows)),
        top_k=_top_k(router, block),
        router_name=hint.router,
        experts_name=hint.experts,
        experts_call_parameters=_call_parameters(experts) if experts is not None else (),
    )


def _find_experts_child(block: nn.Module) -> tuple[str, int] | None:
    """The child holding stacked expert weights, and its number of weighted experts."""
    children = [(name, _unwrapped(child)) for name, child in block.named_children()]
    for name, child in children:
        if isinstance(child, nn.modules.conv._ConvNd):
            continue
        leading = [shape[0] for shape, _ in _shapes(child, recurse=False) if len(shape) == 3]
        if leading and (num_experts := min(leading)) > 1:
            return name, num_experts
    for name, child in children:
        declared = getattr(child, "num_experts", None)
        if _declares_experts(child, declared):
            return name, declared
    return None


def _declares_experts(module: nn.Module, declared: object) -> bool:
    """Whether ``module`` holds expert weights stored as 2-D stacks and says how many experts (DBRX), not a router."""
    if not isinstance(declared, int) or declared < 2 or next(module.parameters(), None) is None:
        return False
    return not _has_router_rows(module, declared)


def _find_router_child(block: nn.Module, num_experts: int, exclude: str) -> tuple[str, int] | None:
    """The child with a 2-D weight of one row per expert (or a few extra); returns its name and the hidden size.

    An exact row count wins over one with extra rows. The hidden size is the input width of the router's first
    matrix, which is the block's hidden size also for routers that are small MLPs (ZAYA).
    """
    candidates: list[tuple[int, str, int]] = []
    for name, child in block.named_children():
        child = _unwrapped(child)
        if name == exclude or any(len(shape) == 3 for shape, _ in _shapes(child)):
            continue
        fitting = _router_rows(child, num_experts)
        if fitting:
            candidates.append((min(fitting) - num_experts, name, _first_matrix_shape(child)[1]))
    if not candidates:
        return None
    _, name, hidden_size = min(candidates)
    return name, hidden_size


def _is_decoder_layer(module: nn.Module) -> bool:
    """Whether the router and experts sit directly in a decoder layer, beside its attention."""
    return any("attn" in name or "attention" in name for name, _ in module.named_children())


def _router_rows(module: nn.Module, num_experts: int) -> list[int]:
    """Row counts of the 2-D parameters of ``module`` that fit a router over ``num_experts`` experts."""
    rows = [shape[0] for shape, _ in _shapes(module) if len(shape) == 2]
    return [r for r in rows if num_experts <= r <= ROUTER_EXTRA_ROWS * num_experts]


def _has_router_rows(module: nn.Module, num_experts: int) -> bool:
    return bool(_router_rows(module, num_experts))


def _first_matrix_shape(module: nn.Module) -> torch.Size:
    """The logical shape of the first 2-D parameter of ``module`` (recursively)."""
    return next(shape for shape, _ in _shapes(module) if len(shape) == 2)


def _top_k(router: nn.Module, block: nn.Module) -> int | None:
    fixed = ROUTER_TOP_K.get(type(_unwrapped(router)).__name__)
    return getattr(router, "top_k", None) or getattr(block, "top_k", None) or fixed


def _unwrapped(module: nn.Module) -> nn.Module:
    """The original module behind a PERFT wrapper, so that detection sees through already-adapted blocks."""
    return getattr(module, "base_layer", module)


def _call_parameters(experts: nn.Module) -> tuple[str, ...]:
    """Names of the experts' forward parameters (unwrapping the experts-implementation decorator)."""
    forward = inspect.unwrap(type(experts).forward)
    parameters = inspect.signature(forward).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in positional)[1:]
