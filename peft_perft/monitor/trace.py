"""Which experts handled this input: per-token, per-layer routing of the base model and of the PERFT adapters.

`routing_trace(model, inputs)` runs one forward pass with temporary hooks and returns a `RoutingTrace` that
exports to JSON Lines or Parquet and draws a token x layer picture for one example. Nothing is hooked outside
that call, so tracing costs nothing when it is not asked for. The helpers that find the adapted layers and
read the base routing are shared with `peft_perft.monitor`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..architectures import token_groups
from .adapted_layers import AdaptedLayer, active_perft_adapters, find_adapted_layers

if TYPE_CHECKING:
    from .pictures import TraceCell

ROUTED_BY_OWN_ROUTER = "R"
ROUTED_BY_BASE = "E"


class BaseRoutingTap:
    """Forward hooks on the frozen experts modules (or routers) that keep the routing of the last forward.

    Reads the (indices, weights) the base router already passed to its experts; the router itself is never
    called again and no output is changed. Blocks whose experts are not called with the routing are skipped.
    """

    def __init__(self, layers: Sequence[AdaptedLayer]) -> None:
        self.layers = [layer for layer in layers if layer.block.spec.experts_routable]
        self.latest: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> BaseRoutingTap:
        for layer in self.layers:
            if layer.block.spec.routes_from_router:
                router = layer.block.base_layer.get_submodule(layer.block.spec.router_name)
                self._handles.append(router.register_forward_hook(partial(self._record_router, layer)))
                continue
            experts = layer.block.spec.experts_module(layer.block.base_layer)
            hook = partial(self._record, layer)
            self._handles.append(experts.register_forward_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.latest.clear()

    def _record(self, layer: AdaptedLayer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        _, expert_index, expert_weight = layer.block.spec.read_experts_call(args, kwargs)
        self.latest[layer.name] = (expert_index.detach(), expert_weight.detach())

    def _record_router(self, layer: AdaptedLayer, module: nn.Module, args: tuple, output: Any) -> None:
        """Where the experts' call does not carry the routing (Llama 4, JetMoE, Switch Transformers), the router's
        output does: read it the way PERFT-E reads it."""
        spec = layer.block.spec
        expert_index, expert_weight = spec.router_routing(output, spec.top_k)
        self.latest[layer.name] = (expert_index.detach(), expert_weight.detach())


class TokenGroupTap:
    """Forward pre-hooks on layer blocks that split their tokens among expert groups (ERNIE-4.5-VL's text and vision
    experts): keeps, per adapted group block, the flat mask of the tokens it received in the last forward, so that
    its routing rows (one per received token) are paired with those tokens and no others."""

    def __init__(self, root: nn.Module, layers: Sequence[AdaptedLayer]) -> None:
        self.groups: dict[str, list[tuple[str, str]]] = {}
        for layer in layers:
            parent, _, child = layer.name.rpartition(".")
            groups = token_groups(root.get_submodule(parent))
            if groups is not None and child in groups.members:
                self.groups.setdefault(parent, []).append((layer.name, child))
        self.root = root
        self.members = {name for members in self.groups.values() for name, _ in members}
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> TokenGroupTap:
        for parent, members in self.groups.items():
            hook = partial(self._record, members)
            self._handles.append(self.root.get_submodule(parent).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.masks.clear()

    def _record(self, members: list[tuple[str, str]], module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks = token_groups(module).masks(module, args, kwargs)
        for name, child in members:
            self.masks[name] = masks[child].detach()


def perft_routing(layer: AdaptedLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, weights) of the adapter experts each token used in the block's last forward; None for D and S."""
    record = layer.block.routing_records.get(adapter_name)
    if record is None:
        return None
    return record.expert_index.detach(), record.expert_weight.detach()


@dataclass
class RoutingTrace:
    """Per token and per adapted layer: the base experts and the PERFT experts selected, with their weights.

    ``rows`` holds one dict per (example, position, layer, adapter) with the keys of `TRACE_COLUMNS`. Padding
    positions are left out. For PERFT-E the adapter experts are the base experts (one per base expert); for
    PERFT-D and -S every adapter expert is active with weight 1.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def examples(self) -> list[int]:
        return sorted({row["example"] for row in self.rows})

    def rows_for(self, example: int) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["example"] == example]

    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON object per row."""
        path = _prepared(path)
        with path.open("w", encoding="utf-8") as stream:
            for row in self.rows:
                stream.write(json.dumps(row) + "\n")
        return path

    def to_parquet(self, path: str | Path) -> Path:
        """Write the rows as a Parquet table (needs pyarrow: ``pip install peft-perft[parquet]``)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(
                "RoutingTrace.to_parquet needs pyarrow; install it with `pip install peft-perft[parquet]` or use "
                "to_jsonl instead."
            ) from error
        path = _prepared(path)
        pq.write_table(pa.Table.from_pylist(self.rows, schema=_parquet_schema(pa)), path)
        return path

    def plot(self, path: str | Path, example: int = 0) -> Path:
        """Save a token x layer picture of one example: the top expert of each router, selected experts written in."""
        from .pictures import draw_routing_trace  # here, not above: pictures imports modality, which imports us

        rows = self.rows_for(example)
        if not rows:
            raise ValueError(f"Example {example} is not in this trace; it holds examples {self.examples()}.")
        panels = [(title, _panel_cells(rows, key)) for title, key in _plot_panels(rows)]
        if not panels:
            raise ValueError("Nothing to draw: this trace has neither base routing nor a PERFT-R adapter.")
        labels = {row["position"]: _display_text(row) for row in rows}
        layers = sorted({row["layer"] for row in rows})
        return draw_routing_trace(panels, labels, layers, _prepared(path), example)


TRACE_COLUMNS = (
    "example",
    "position",
    "token_id",
    "token",
    "text",
    "layer",
    "module",
    "adapter",
    "variant",
    "base_experts",
    "base_weights",
    "perft_experts",
    "perft_weights",
)


def _parquet_schema(pa: Any) -> Any:
    experts, weights = pa.list_(pa.int64()), pa.list_(pa.float64())
    types = {
        "example": pa.int64(),
        "position": pa.int64(),
        "token_id": pa.int64(),
        "token": pa.string(),
        "text": pa.string(),
        "layer": pa.int64(),
        "module": pa.string(),
        "adapter": pa.string(),
        "variant": pa.string(),
        "base_experts": experts,
        "base_weights": weights,
        "perft_experts": experts,
        "perft_weights": weights,
    }
    return pa.schema([(name, types[name]) for name in TRACE_COLUMNS])


@torch.no_grad()
def routing_trace(
    model: nn.Module,
    inputs: str | Sequence[str] | Mapping[str, Any],
    *,
    tokenizer: Any = None,
    adapter_names: Sequence[str] | None = None,
) -> RoutingTrace:
    """Run ``model`` once on ``inputs`` and record, per token and adapted layer, which experts handled it.

    For an encoder-decoder model, ``inputs`` holds ``input_ids`` and ``decoder_input_ids``: the encoder's blocks are
    traced on the former, the decoder's (``module`` names with ``decoder.``) on the latter.

    ``inputs`` is a prompt, a list of prompts (both need ``tokenizer``), or a mapping with ``input_ids`` (and
    optionally ``attention_mask``) as a tensor or nested lists; its other tensors (a vision-language model's
    ``pixel_values``, ``image_grid_thw``, ...) are passed to the model too. The model runs in eval mode; its mode is
    restored afterwards. ``adapter_names`` limits the trace to some of the active adapters.
    """
    root, layers = find_adapted_layers(model)
    encoder_decoder = getattr(getattr(root, "config", None), "is_encoder_decoder", False)
    if encoder_decoder and not (isinstance(inputs, Mapping) and "decoder_input_ids" in inputs):
        raise ValueError(
            f"{type(root).__name__} is an encoder-decoder model: pass a mapping with input_ids (the encoder's tokens) "
            f"and decoder_input_ids (the decoder's), so that each block's routing is paired with its own tokens."
        )
    batch = _as_batch(inputs, tokenizer, model)
    was_training = model.training
    tap = BaseRoutingTap(layers).attach()
    groups = TokenGroupTap(root, layers).attach()
    try:
        model.eval()
        model(**batch, use_cache=False)
        rows = _trace_rows(layers, tap, batch, tokenizer, adapter_names, groups.masks)
    finally:
        tap.detach()
        groups.detach()
        model.train(was_training)
    return RoutingTrace(rows)


def _as_batch(inputs: Any, tokenizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask on the model's device, from prompts or token ids."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and all(isinstance(item, str) for item in inputs):
        if tokenizer is None:
            raise ValueError("routing_trace got text but no tokenizer: pass tokenizer=... or token ids.")
        inputs = tokenizer(list(inputs), return_tensors="pt", padding=True)
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise TypeError(
            f"routing_trace expects a prompt, a list of prompts or a mapping with 'input_ids'; got "
            f"{type(inputs).__name__}."
        )
    input_ids = torch.as_tensor(inputs["input_ids"])
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    mask = inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).reshape(input_ids.shape)
    device = next(model.parameters()).device
    # Other model inputs (pixel_values, image_grid_thw, mm_token_type_ids of a vision-language model) pass through.
    extra = {
        name: value.to(device)
        for name, value in inputs.items()
        if name not in ("input_ids", "attention_mask", "labels") and isinstance(value, torch.Tensor)
    }
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), **extra}


def _trace_rows(
    layers: list[AdaptedLayer],
    tap: BaseRoutingTap,
    batch: dict[str, torch.Tensor],
    tokenizer: Any,
    adapter_names: Sequence[str] | None,
    group_masks: Mapping[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """One row per kept token, adapted layer and adapter. A block of an expert group (``group_masks``) got only some
    of the tokens, in order: its routing row r belongs to the r-th token it received, and other tokens get no row
    from it (a group that received none, such as the vision experts of a text-only input, adds no row)."""
    sequences = {False: _sequence(batch, "input_ids", "attention_mask", tokenizer)}
    if "decoder_input_ids" in batch:
        sequences[True] = _sequence(batch, "decoder_input_ids", "decoder_attention_mask", tokenizer)
    rows = []
    for layer in layers:
        decoder = in_decoder(layer.name) and True in sequences
        keep, positions, token_ids, tokens, texts = sequences[decoder]
        received = group_masks[layer.name].cpu() if layer.name in group_masks else None
        selected = keep if received is None else keep & received
        routing_row = torch.arange(len(token_ids)) if received is None else received.long().cumsum(0) - 1
        base = _routing_lists(tap.latest.get(layer.name), drop_skipped=True)
        for adapter in active_perft_adapters(layer):
            if adapter_names is not None and adapter not in adapter_names:
                continue
            variant = layer.block.perft_configs[adapter].variant
            perft = _adapter_lists(layer, adapter, len(token_ids))
            for flat_index in selected.nonzero().flatten().tolist():
                example, position = positions[flat_index]
                row = int(routing_row[flat_index])
                rows.append(
                    {
                        "example": example,
                        "position": position,
                        "token_id": token_ids[flat_index],
                        "token": tokens[flat_index],
                        "text": texts[flat_index],
                        "layer": layer.layer,
                        "module": layer.name,
                        "adapter": adapter,
                        "variant": variant,
                        "base_experts": base[0][row] if base else None,
                        "base_weights": base[1][row] if base else None,
                        "perft_experts": perft[0][row],
                        "perft_weights": perft[1][row],
                    }
                )
    rows.sort(key=lambda row: (row["example"], row["position"], row["layer"], row["adapter"]))
    return rows


def in_decoder(module_name: str) -> bool:
    """Whether a block sits in the decoder stack of an encoder-decoder model (``decoder.block.1...``)."""
    return re.search(r"(?:^|\.)decoder\.", module_name) is not None


def _sequence(batch: dict[str, torch.Tensor], ids_key: str, mask_key: str, tokenizer: Any) -> tuple:
    """(kept flat indices mask, (example, position) per flat index, token ids, token strings, token texts)."""
    input_ids = batch[ids_key].cpu()
    mask = batch.get(mask_key)
    keep = (torch.ones_like(input_ids) if mask is None else mask.cpu()).reshape(-1).bool()
    positions = [(example, position) for example in range(input_ids.shape[0]) for position in range(input_ids.shape[1])]
    token_ids = input_ids.reshape(-1).tolist()
    return keep, positions, token_ids, _token_strings(token_ids, tokenizer), _token_texts(token_ids, tokenizer)


def _routing_lists(
    routing: tuple[torch.Tensor, torch.Tensor] | None, drop_skipped: bool = False
) -> tuple[list, list] | None:
    """Per-token expert and weight lists; ``drop_skipped`` leaves out the slots the base model routed past its
    weighted experts (identity or skip experts), which arrive as expert 0 with weight 0."""
    if routing is None:
        return None
    indices, weights = routing[0].cpu().tolist(), routing[1].float().cpu().tolist()
    if not drop_skipped:
        return indices, weights
    kept = [
        [(i, w) for i, w in zip(row_i, row_w, strict=True) if w != 0]
        for row_i, row_w in zip(indices, weights, strict=True)
    ]
    return [[i for i, _ in row] for row in kept], [[w for _, w in row] for row in kept]


def _adapter_lists(layer: AdaptedLayer, adapter: str, num_tokens: int) -> tuple[list, list]:
    """Routed adapters: what their router (R) or the base router (E) chose; D and S: every expert, weight 1."""
    variant = layer.block.perft_configs[adapter].variant
    routed = _routing_lists(perft_routing(layer, adapter), drop_skipped=variant == ROUTED_BY_BASE)
    if routed is not None:
        return routed
    num_experts = layer.block.perft_configs[adapter].resolved_num_experts(layer.block.spec.num_experts)
    return [list(range(num_experts))] * num_tokens, [[1.0] * num_experts] * num_tokens


def _token_strings(token_ids: list[int], tokenizer: Any) -> list[str | None]:
    if tokenizer is None:
        return [None] * len(token_ids)
    return list(tokenizer.convert_ids_to_tokens(token_ids))


def _token_texts(token_ids: list[int], tokenizer: Any) -> list[str | None]:
    """Each token decoded on its own: byte-level pieces such as 'Ġe' read as ' e'."""
    if tokenizer is None:
        return [None] * len(token_ids)
    return [tokenizer.decode([token_id]) for token_id in token_ids]


def _prepared(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _plot_panels(rows: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(title, row key) of each picture panel: the base router, then every adapter that routes tokens."""
    if any(row["base_experts"] is not None for row in rows):
        yield "base model router", "base"
    for adapter in sorted({row["adapter"] for row in rows if row["variant"] == ROUTED_BY_OWN_ROUTER}):
        yield f"PERFT-R router ({adapter})", adapter


def _display_text(row: dict[str, Any]) -> str:
    """The token as the reader sees it: decoded text with visible spaces and newlines, else its id."""
    text = row.get("text") if row.get("text") is not None else row["token"]
    if text is None:
        return str(row["token_id"])
    return text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def _panel_cells(rows: list[dict[str, Any]], key: str) -> list[TraceCell]:
    """(layer, position, top expert, its share of the token's routing weight) of every row routed in the panel
    ``key``, in row order; the share is None where the weights do not sum to a positive number."""
    cells = []
    for row in rows:
        experts, weights = _panel_routing(row, key)
        if not experts:
            continue
        best = max(range(len(weights)), key=weights.__getitem__)
        total = float(sum(weights))
        cells.append((row["layer"], row["position"], experts[best], weights[best] / total if total > 0 else None))
    return cells


def _panel_routing(row: dict[str, Any], key: str) -> tuple[list | None, list | None]:
    if key == "base":
        return row["base_experts"], row["base_weights"]
    if row["adapter"] == key:
        return row["perft_experts"], row["perft_weights"]
    return None, None
