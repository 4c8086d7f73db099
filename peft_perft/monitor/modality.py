"""Routing by modality: how image tokens and text tokens share the experts, per layer, from a routing trace.

In a vision-language MoE model the image patches enter the language model as placeholder tokens whose embeddings
the vision tower replaced; which token ids those are is in the model's config (``image_token_id``, ...). Given a
`RoutingTrace` and that map, `modality_load` counts per layer how often each base expert (and each PERFT-R expert)
was chosen by the tokens of each modality, `ModalityLoad.overlap` says how much two modalities' expert loads
coincide (1: the same distribution, 0: disjoint experts), `stack_load` does the same for the encoder and decoder
of an encoder-decoder model. `peft_perft.monitor.pictures.draw_modality_load` draws both modalities as one
layer x expert heatmap on the shared relative scale of the routing pictures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .trace import RoutingTrace, in_decoder

TEXT = "text"
IMAGE = "image"
ENCODER = "encoder"
DECODER = "decoder"


@dataclass(frozen=True)
class ModalityLoad:
    """Expert choices counted per modality and layer: ``counts[m][l][e]`` is how many (token, slot) pairs of
    modality ``modalities[m]`` chose expert ``e`` in layer ``layers[l]``; ``top_k`` slots per token."""

    modalities: tuple[str, ...]
    layers: tuple[int, ...]
    counts: torch.Tensor
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    def shares(self) -> torch.Tensor:
        """Fraction of each modality's tokens that each expert handled, per layer (sums to top_k over experts)."""
        slots = self.counts.sum(dim=-1, keepdim=True)
        return torch.where(slots > 0, self.top_k * self.counts / slots.clamp_min(1), torch.zeros_like(self.counts))

    def overlap(self, first: str = IMAGE, second: str = TEXT) -> torch.Tensor:
        """Per layer, sum over experts of min(p_first, p_second) of the two modalities' expert distributions."""
        distributions = self.shares() / self.top_k
        a, b = distributions[self.modalities.index(first)], distributions[self.modalities.index(second)]
        return torch.minimum(a, b).sum(dim=-1)

    def to_dict(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "layers": list(self.layers),
            "top_k": self.top_k,
            "counts": self.counts.tolist(),
        }


def modality_load(
    trace: RoutingTrace,
    modality_of_token: Mapping[int, str],
    *,
    source: str = "base",
    adapter: str | None = None,
    num_experts: int | None = None,
    default: str = TEXT,
) -> ModalityLoad:
    """Count the expert choices of ``trace`` by modality.

    ``modality_of_token`` maps token ids to a modality (e.g. ``{config.image_token_id: "image"}``); other tokens
    count as ``default``. ``source`` is "base" (the model's own routing) or "perft" (a PERFT-R router's choices, of
    ``adapter`` when the trace holds several). ``num_experts`` (per block) defaults to the highest expert index
    seen plus one. Blocks that share a layer hold different experts (ERNIE-4.5-VL's text and vision expert groups):
    each gets its own expert columns, in module-name order, so its experts never count as another group's.
    """
    modalities = tuple(dict.fromkeys([default, *sorted(set(modality_of_token.values()))]))

    def classify(row: dict) -> str:
        return modality_of_token.get(row["token_id"], default)

    return _load(trace, classify, modalities, source, adapter, num_experts, separate_groups=True)


def stack_load(
    trace: RoutingTrace, *, source: str = "base", adapter: str | None = None, num_experts: int | None = None
) -> ModalityLoad:
    """Count the expert choices of an encoder-decoder model's trace by stack: "encoder" and "decoder" play the
    modalities, so ``overlap("encoder", "decoder")`` compares the two stacks' blocks of the same depth."""
    return _load(trace, _stack_of, (ENCODER, DECODER), source, adapter, num_experts)


def _stack_of(row: dict) -> str:
    return DECODER if in_decoder(row["module"]) else ENCODER


def _load(
    trace: RoutingTrace,
    classify: Callable[[dict], str],
    modalities: tuple[str, ...],
    source: str,
    adapter: str | None,
    num_experts: int | None,
    separate_groups: bool = False,
) -> ModalityLoad:
    if source not in ("base", "perft"):
        raise ValueError(f"source must be 'base' or 'perft', not {source!r}.")
    key = f"{source}_experts"
    rows = [row for row in trace.rows if row[key] is not None and (adapter is None or row["adapter"] == adapter)]
    if not rows:
        raise ValueError(f"The trace holds no {source} routing{f' of adapter {adapter!r}' if adapter else ''}.")
    if source == "base":
        rows = list({(row["example"], row["position"], row["module"]): row for row in rows}.values())
    layers = tuple(sorted({row["layer"] for row in rows}))
    experts = num_experts or 1 + max(expert for row in rows for expert in row[key])
    first_column = _group_columns(rows, experts) if separate_groups else {}
    columns = experts * (1 + max(first_column.values(), default=0) // experts)
    counts = torch.zeros(len(modalities), len(layers), columns)
    for row in rows:
        offset = first_column.get(row["module"], 0)
        for expert in row[key]:
            counts[modalities.index(classify(row)), layers.index(row["layer"]), offset + expert] += 1
    top_k = max(len(row[key]) for row in rows)
    return ModalityLoad(modalities, layers, counts, top_k)


def _group_columns(rows: list[dict], experts: int) -> dict[str, int]:
    """First expert column of each block: the blocks of one layer, in name order, get consecutive column ranges."""
    modules_by_layer: dict[int, set[str]] = {}
    for row in rows:
        modules_by_layer.setdefault(row["layer"], set()).add(row["module"])
    return {
        module: rank * experts for modules in modules_by_layer.values() for rank, module in enumerate(sorted(modules))
    }
