"""Routing replay for reinforcement learning on MoE models: one switch that records the experts every router chose
while a rollout was generated and makes the forward that scores it choose the same ones.

Why: GRPO and its relatives score a rollout again for the update. On an MoE model the experts chosen at scoring can
differ from those chosen at generation (other kernels, a policy that moved, another engine), and training can
collapse; recording the routing and replaying it removes that mismatch. PERFT-R adds a router of its own, with the
same problem.

Transformers 5.25 and TRL 1.16 have no routing capture or replay: neither ``MoERouting`` nor an
``output_moe_routing``/``moe_routing`` argument exists in them (an upstream prototype for Qwen2-MoE is not in these
releases), and GRPOTrainer passes no routing from generation to scoring. So `RoutingReplay` is the switch for both
routers: the base router's top-k experts (for routers that return ``(logits, top-k weights, top-k indices)``, the
shape of OLMoE, Qwen2/3-MoE and Mixtral in Transformers 5) and each PERFT-R adapter's. PERFT-E needs nothing of its
own: it reuses the routing the base passes to its experts, so it follows the replayed base routing.
`add_routing_replay(trainer)` puts the switch into TRL's GRPOTrainer.

Replay keeps the recorded *indices* and recomputes the *weights* from the current router, as Megatron-LM's router
replay does: the update's gradient still reaches the routers and everything before them. The recording holds
indices only, in the smallest integer type that fits (one byte for up to 256 experts): per token and layer,
``top_k`` bytes for the base router plus ``top_k`` for each PERFT-R adapter (see `RecordedRouting.bytes_per_token`).

Positions are counted per sequence over consecutive forwards: generation (a prefill, then one token per step) records
``(batch, positions, top_k)`` per router; a replayed forward over ``s`` tokens per row uses the next ``s`` recorded
positions and routes live any position past the end of the recording (the last generated token, whose own output
is never scored).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layer import PerftMoeBlock

BASE_ROUTER = "base"
"""The key's second part for the base model's router (the others name a PERFT-R adapter)."""

RouterKey = tuple[str, str]


@dataclass
class RecordedRouting:
    """The experts each router chose for each token: ``experts[(block name, "base" or adapter)]`` is (B, S, K)."""

    experts: dict[RouterKey, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.experts.values())).shape[0] if self.experts else 0

    @property
    def num_positions(self) -> int:
        return next(iter(self.experts.values())).shape[1] if self.experts else 0

    def rows(self, index: slice | torch.Tensor) -> RecordedRouting:
        """The recording of some sequences only (a scoring micro-batch of the generation batch)."""
        return RecordedRouting({key: value[index] for key, value in self.experts.items()})

    def bytes_per_token(self) -> int:
        """Memory of one token's routing over all layers and routers: sum of top-k x bytes per index."""
        return sum(value.shape[-1] * value.element_size() for value in self.experts.values())

    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in self.experts.values())

    def packed(self) -> torch.Tensor:
        """All routers' indices side by side, (B, S, sum of top-k), in one integer type: a per-sequence tensor that
        a trainer's batch can carry through its shuffling and splitting."""
        widest = max((value.dtype for value in self.experts.values()), key=lambda dtype: torch.iinfo(dtype).bits)
        return torch.cat([value.to(widest) for value in self.experts.values()], dim=-1)

    def unpacked(self, packed: torch.Tensor) -> RecordedRouting:
        """The routing of `packed` rows laid out by this recording's routers (their order and top-k)."""
        widths = [value.shape[-1] for value in self.experts.values()]
        return RecordedRouting(dict(zip(self.experts, packed.split(widths, dim=-1), strict=True)))

    def agreement(self, other: RecordedRouting) -> float:
        """Share of (token, router) pairs whose set of experts is the same in both recordings, over the positions
        both hold: how far routing at scoring strayed from routing at generation when replay was off."""
        same, total = 0, 0
        for key, mine in self.experts.items():
            theirs = other.experts[key]
            positions = min(mine.shape[1], theirs.shape[1])
            mine_sorted = mine[:, :positions].long().sort(dim=-1).values
            theirs_sorted = theirs[:, :positions].long().sort(dim=-1).values
            same += int((mine_sorted == theirs_sorted).all(dim=-1).sum())
            total += mine_sorted.shape[0] * positions
        return same / total if total else 1.0


class RoutingReplay:
    """Record and replay the top-k routing of a PERFT model's base routers and PERFT-R routers.

    Usage (``model`` a PeftModel with PERFT adapters, or its base model)::

        replay = RoutingReplay(model)
        with replay.record() as routing:
            rollout = model.generate(**prompts, do_sample=True)
        with replay.replay(routing.rows(slice(0, 4))):  # the micro-batch's sequences
            loss = policy_loss(model(input_ids=rollout[:4], ...))
            loss.backward()

    Args:
        model: the model whose adapted MoE blocks are recorded or replayed.
        base: also record/replay the base routers; False covers PERFT-R's routers only.
    """

    def __init__(self, model: nn.Module, base: bool = True) -> None:
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.blocks = {name: module for name, module in root.named_modules() if isinstance(module, PerftMoeBlock)}
        self._names = {id(module): name for name, module in self.blocks.items()}
        if not self.blocks:
            raise ValueError(
                f"RoutingReplay found no PERFT-adapted MoE block in {type(root).__name__}: wrap the model with "
                f"get_peft_model(model, PerftConfig(...)) (or load an adapter) first."
            )
        unsupported = [name for name, block in self.blocks.items() if not _base_router_replayable(block)]
        if base and unsupported:
            raise ValueError(
                f"RoutingReplay cannot replay the base routers of {unsupported}: their routing reaches the experts "
                f"other than as (logits, top-k weights, top-k indices) from the router (Llama 4, JetMoE, or experts "
                f"whose call does not carry it). Use RoutingReplay(model, base=False) to replay PERFT-R's only."
            )
        self.root = root
        self.base = base
        self._mode: str | None = None
        self._window: tuple[int, int, int] = (0, 0, 0)  # (batch, first position, positions) of the current forward
        self._position = 0
        self._chunks: dict[RouterKey, list[torch.Tensor]] = {}
        self._routing = RecordedRouting()
        self._base_renormalises: dict[RouterKey, bool] = {}
        self._handles: list[RemovableHandle] = []

    @contextmanager
    def record(self) -> Iterator[RecordedRouting]:
        """Record every router's top-k experts, position after position; the recording is filled on exit."""
        recording = RecordedRouting()
        self._chunks = {}
        with self._active("record"):
            yield recording
        recording.experts.update({key: torch.cat(chunks, dim=1) for key, chunks in self._chunks.items()})
        self._chunks = {}

    @contextmanager
    def replay(self, routing: RecordedRouting) -> Iterator[None]:
        """Make every router use the recorded experts (weights recomputed from the current router). Keep the
        context open through ``backward()`` when activation checkpointing recomputes the blocks there."""
        self._routing = routing
        self._base_renormalises = {}
        try:
            with self._active("replay"):
                yield
        finally:
            self._routing = RecordedRouting()

    @contextmanager
    def _active(self, mode: str) -> Iterator[None]:
        if self._mode is not None:
            raise RuntimeError(f"RoutingReplay is already in {self._mode!r} mode: record and replay do not nest.")
        self._mode, self._position = mode, 0
        self._handles.append(self.root.register_forward_pre_hook(self._start_forward, with_kwargs=True))
        for name, block in self.blocks.items():
            block.routing_replay = self._perft_routing
            if self.base:
                router = block.base_layer.get_submodule(block.spec.router_name)
                self._handles.append(router.register_forward_hook(self._base_router_hook((name, BASE_ROUTER))))
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for block in self.blocks.values():
                block.routing_replay = None
            self._mode = None

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Each forward covers the next positions of every sequence: learn how many from its input."""
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError(
                f"RoutingReplay needs input_ids or inputs_embeds in the call of {type(module).__name__} to tell "
                f"which positions of which sequences a forward covers."
            )
        batch, positions = tokens.shape[:2]
        if self._mode == "replay" and batch != self._routing.batch_size:
            raise ValueError(
                f"RoutingReplay: the forward has {batch} sequences but the replayed routing holds "
                f"{self._routing.batch_size}. Pass the routing of this micro-batch's rows: routing.rows(start:end)."
            )
        self._window = (batch, self._position, positions)
        self._position += positions

    def _perft_routing(
        self, block: PerftMoeBlock, adapter_name: str, router_logits: torch.Tensor, routing: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PERFT-R's hook (called by the block with the router's logits and its live top-k choice)."""
        key = (self._names[id(block)], adapter_name)
        index, weight = routing
        if self._mode == "record":
            self._keep(key, index, block.perft_configs[adapter_name].resolved_num_experts(0))
            return index, weight
        forced = self._forced(key, index)
        if block.perft_configs[adapter_name].normalize_top_k:
            return forced, torch.softmax(router_logits.gather(-1, forced), dim=-1)
        return forced, torch.softmax(router_logits, dim=-1).gather(-1, forced)

    def _base_router_hook(self, key: RouterKey):
        def hook(module: nn.Module, args: tuple, output):
            logits, weight, index = _router_output(output, key)
            if self._mode == "record":
                self._keep(key, index, logits.shape[-1])
                return None
            forced = self._forced(key, index)
            renormalise = self._base_renormalises.get(key)
            if renormalise is None:
                renormalise = self._base_renormalises[key] = _weight_rule(logits, weight, index, key)
            return logits, _softmax_top_k_weight(logits, forced, renormalise).to(weight.dtype), forced

        return hook

    def _keep(self, key: RouterKey, index: torch.Tensor, num_experts: int) -> None:
        batch, _, positions = self._window
        compact = index.detach().to(_index_dtype(num_experts)).reshape(batch, positions, -1)
        self._chunks.setdefault(key, []).append(compact)

    def _forced(self, key: RouterKey, live: torch.Tensor) -> torch.Tensor:
        """The recorded experts of this forward's positions; live ones past the end of the recording."""
        if key not in self._routing.experts:
            raise KeyError(
                f"RoutingReplay: the replayed routing has no record for router {key}; record it with the same "
                f"RoutingReplay settings (base={self.base}) and adapters."
            )
        batch, start, positions = self._window
        recorded = self._routing.experts[key][:, start : start + positions]
        forced = live.reshape(batch, positions, -1).clone()
        forced[:, : recorded.shape[1]] = recorded.to(device=live.device, dtype=live.dtype)
        return forced.reshape(live.shape)


def _base_router_replayable(block: PerftMoeBlock) -> bool:
    return block.spec.experts_routable and not block.spec.routes_from_router


def _router_output(output, key: RouterKey) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if (
        isinstance(output, tuple)
        and len(output) == 3
        and not output[2].is_floating_point()
        and output[1].shape == output[2].shape
    ):
        return output
    raise TypeError(
        f"RoutingReplay cannot replay the base router of {key[0]!r}: it does not return (logits, top-k weights, "
        f"top-k indices) as the softmax top-k routers of OLMoE, Qwen2/3-MoE and Mixtral do. Use "
        f"RoutingReplay(model, base=False) to replay PERFT-R's routers only."
    )


def _softmax_top_k_weight(logits: torch.Tensor, index: torch.Tensor, renormalise: bool) -> torch.Tensor:
    weight = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, index)
    return weight / weight.sum(dim=-1, keepdim=True) if renormalise else weight


def _weight_rule(logits: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, key: RouterKey) -> bool:
    """Whether the router renormalises its top-k softmax weights, found by reproducing its own live weights; a
    router that computes them otherwise (sigmoid, bias, groups) is refused rather than replayed wrongly."""
    tolerance = max(1e-3, 2 * torch.finfo(weight.dtype).eps)  # the router rounds its weights to its dtype
    for renormalise in (False, True):
        candidate = _softmax_top_k_weight(logits.detach(), index, renormalise).to(weight.dtype)
        if torch.allclose(candidate, weight.detach(), rtol=tolerance, atol=1e-6):
            return renormalise
    raise TypeError(
        f"RoutingReplay cannot replay the base router of {key[0]!r}: its top-k weights are not the softmax of its "
        f"logits (renormalised or not), so replayed experts would get wrong weights. Use RoutingReplay(model, "
        f"base=False) to replay PERFT-R's routers only."
    )


def _index_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds every expert index."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 2**15 else torch.int32


ROUTING_COLUMN = "perft_routing_replay"
"""The batch entry in which `add_routing_replay` carries each rollout's recorded routing through GRPOTrainer."""

_MULTIMODAL_ARGUMENTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def add_routing_replay(trainer: Any, base: bool = True) -> RoutingReplay:
    """Make TRL's ``GRPOTrainer`` (1.16) score every rollout with the routing it was generated with.

    The routing recorded while ``generate`` runs rides in the rollout batch as the entry ``ROUTING_COLUMN``, so
    TRL's shuffling and splitting into micro-batches keep it with its sequences; the old-policy and reference
    log-probabilities and the update's forward (and its backward, where activation checkpointing recomputes the
    blocks) replay it. This wraps five GRPOTrainer methods of this TRL release on the instance (it changes no
    class): Transformers' own ``generate`` path only (not vLLM, continuous batching, tools or ``rollout_func``).
    """
    unsupported = [
        name
        for name, active in (
            ("use_vllm", getattr(trainer, "use_vllm", False)),
            ("use_transformers_continuous_batching", getattr(trainer, "use_transformers_continuous_batching", False)),
            ("tools", getattr(trainer, "tools", None)),
            ("rollout_func", getattr(trainer, "rollout_func", None)),
        )
        if active
    ]
    needed = ("_generate_single_turn", "_generate_and_score_completions", "_get_per_token_logps_and_entropies")
    missing = [name for name in (*needed, "_compute_loss", "training_step") if not hasattr(trainer, name)]
    if unsupported or missing:
        raise ValueError(
            f"add_routing_replay supports TRL 1.16's GRPOTrainer generating with Transformers' generate; this "
            f"trainer has {unsupported or 'no'} unsupported options and lacks methods {missing or 'none'}. Record "
            f"and replay in your own loop with RoutingReplay.record()/replay() instead."
        )
    replay = RoutingReplay(trainer.model, base=base)
    _GRPOReplay(trainer, replay).install()
    return replay


class _GRPOReplay:
    """The wrappers `add_routing_replay` puts on one GRPOTrainer: record at generation, replay at scoring."""

    def __init__(self, trainer: Any, replay: RoutingReplay) -> None:
        self.trainer = trainer
        self.replay = replay
        self.generated: RecordedRouting | None = None
        self.layout: RecordedRouting | None = None  # the latest recording: the routers' order and widths
        self.update_replay: ExitStack | None = None

    def install(self) -> None:
        wrappers: dict[str, Callable] = {
            "_generate_single_turn": self._generate_single_turn,
            "_generate_and_score_completions": self._generate_and_score_completions,
            "_get_per_token_logps_and_entropies": self._per_token_logps,
            "_compute_loss": self._compute_loss,
            "training_step": self._training_step,
        }
        for name, wrapper in wrappers.items():
            setattr(self.trainer, name, functools.partial(wrapper, getattr(self.trainer, name)))

    def _generate_single_turn(self, original: Callable, *args, **kwargs):
        with self.replay.record() as routing:
            result = original(*args, **kwargs)
        self.generated = self.layout = routing
        return result

    def _generate_and_score_completions(self, original: Callable, inputs):
        self.generated = None
        try:
            output = original(inputs)
            if self.generated is not None:
                output[ROUTING_COLUMN] = self.generated.packed()
        finally:
            self.generated = None
        return output

    def _per_token_logps(self, original: Callable, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """Old-policy and reference log-probabilities, scored micro-batch by micro-batch with the rollout's routing
        (the update's own call already runs inside the replay `_compute_loss` opened)."""
        if self.generated is None or self.replay._mode is not None:
            return original(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if any(kwargs.get(name) is not None for name in _MULTIMODAL_ARGUMENTS):
            raise NotImplementedError("add_routing_replay covers text-only GRPO; this batch has multimodal inputs.")
        size = kwargs.pop("batch_size", None) or input_ids.size(0)
        results = []
        for start in range(0, input_ids.size(0), size):
            rows = slice(start, start + size)
            with self.replay.replay(self.generated.rows(rows)):
                results.append(original(model, input_ids[rows], attention_mask[rows], logits_to_keep, **kwargs))
        log_probs, entropies, aux_losses = zip(*results, strict=True)
        return (
            torch.cat(log_probs),
            None if entropies[0] is None else torch.cat(entropies),
            None if aux_losses[0] is None else torch.stack(aux_losses).mean(),
        )

    def _compute_loss(self, original: Callable, model, inputs):
        packed = inputs.get(ROUTING_COLUMN)
        if packed is None:
            return original(model, inputs)
        routing = self.layout.unpacked(packed)
        if not model.training:
            with self.replay.replay(routing):
                return original(model, inputs)
        self._close_update_replay()
        self.update_replay = ExitStack()
        self.update_replay.enter_context(self.replay.replay(routing))  # closed after the backward, by training_step
        return original(model, inputs)

    def _training_step(self, original: Callable, *args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            self._close_update_replay()

    def _close_update_replay(self) -> None:
        if self.update_replay is not None:
            self.update_replay.close()
            self.update_replay = None
