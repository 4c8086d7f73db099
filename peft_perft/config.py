"""`PerftConfig`: the hyper-parameters of a PERFT adapter, validated when it is built."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft import PeftConfig, PeftType

VARIANTS = ("R", "E", "D", "S")
ADAPTER_TYPES = ("lora", "parallel_adapter")
DEFAULT_NUM_EXPERTS = {"R": 8, "D": 2, "S": 1}
DEFAULT_TOP_K_R = 2
# adapter_config.json names the bundled demo model by this id, not by its folder inside one user's environment: the
# id is resolved to the bundled folder of whichever installation loads the adapter. Not a valid Hub id, on purpose.
BUNDLED_MODEL_ID = "peft-perft:demo-olmoe"
BUNDLED_MODEL_PATH = Path(__file__).resolve().parent / "demo" / "assets" / "demo-olmoe"


def perft_peft_type() -> PeftType:
    """Return ``PeftType.PERFT``, adding the member to peft's enum the first time (idempotent on re-import)."""
    if "PERFT" in PeftType.__members__:
        return PeftType["PERFT"]
    member = str.__new__(PeftType, "PERFT")
    member._name_ = "PERFT"
    member._value_ = "PERFT"
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_["PERFT"] = member
    PeftType._value2member_map_["PERFT"] = member
    PeftType._member_names_.append("PERFT")
    type.__setattr__(PeftType, "PERFT", member)
    return member


@dataclass
class PerftConfig(PeftConfig):
    """Configuration of a PERFT adapter: bottleneck "PEFT experts" parallel to every frozen MoE block.

    Variants (Liu et al., arXiv 2411.08212):
        - ``"R"``: ``num_experts`` adapter experts behind a new trainable top-``top_k`` router.
        - ``"E"``: one adapter expert per base expert, driven by the model's own frozen routing.
        - ``"D"``: ``num_experts`` always-active adapter experts.
        - ``"S"``: one always-active adapter expert.

    Each expert computes ``(lora_alpha / r) * B act(A dropout(h))`` with ``act`` the identity for
    ``adapter_type="lora"`` and SiLU for ``adapter_type="parallel_adapter"``.
    """

    variant: Literal["R", "E", "D", "S"] = field(default="R", metadata={"help": "PERFT variant: R, E, D or S."})
    r: int = field(default=8, metadata={"help": "Bottleneck rank of each adapter expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: experts are scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    adapter_type: Literal["lora", "parallel_adapter"] = field(
        default="lora", metadata={"help": "'lora' (linear bottleneck) or 'parallel_adapter' (SiLU bottleneck)."}
    )
    num_experts: int | None = field(
        default=None,
        metadata={"help": "Adapter experts per block. Default: R 8, D 2, S 1, E the model's expert count."},
    )
    top_k: int | None = field(
        default=None, metadata={"help": "Experts per token for PERFT-R (default 2). E uses the model's own top-k."}
    )
    normalize_top_k: bool = field(default=True, metadata={"help": "PERFT-R: renormalise top-k weights to sum 1."})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "PERFT-R: weight of the adapter router's load-balancing loss."}
    )
    router_init_std: float = field(default=0.02, metadata={"help": "PERFT-R: std of the router's normal init."})
    dispatch_backend: str = field(
        default="auto", metadata={"help": "Routed-expert kernel: 'auto' or a name from peft_perft.dispatch."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "B = 0 so that a fresh adapter leaves the model unchanged; False: B random."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "MoE blocks to adapt (names or regex). None: every MoE block, found by shape."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never to adapt."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Model layer indices to adapt (counts all layers, dense ones included)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, needed with layers_to_transform on unusual models."}
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained and saved."})
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token ids whose embeddings are trained (written by TRL)."}
    )
    target_experts: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "PERFT-E only: per MoE block (its module name, e.g. 'model.layers.3.mlp'), the base experts that "
            "get an adapter expert; blocks left out get none. None: every expert of every block."
        },
    )
    target_experts_source: str | None = field(
        default=None, metadata={"help": "How target_experts was chosen (written by peft_perft.selection; the card)."}
    )
    rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Per MoE block name, its own rank (other blocks: r); the block's scaling is lora_alpha / its "
            "rank, as with peft LoRA's rank_pattern. peft_perft.selection.spread_rank writes one from the routing."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = perft_peft_type()
        if self.base_model_name_or_path == BUNDLED_MODEL_ID:
            self.base_model_name_or_path = str(BUNDLED_MODEL_PATH)
        self.variant = self.variant.upper() if isinstance(self.variant, str) else self.variant
        self._validate()
        if isinstance(self.target_modules, list):
            self.target_modules = list(dict.fromkeys(self.target_modules))
        if self.target_experts is not None:
            self.target_experts = {block: sorted(set(experts)) for block, experts in self.target_experts.items()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save as peft does, naming the bundled demo model by `BUNDLED_MODEL_ID` so the folder loads anywhere."""
        if not _is_bundled_model(self.base_model_name_or_path):
            return super().save_pretrained(save_directory, **kwargs)
        portable = copy.copy(self)
        portable.base_model_name_or_path = BUNDLED_MODEL_ID
        return super(PerftConfig, portable).save_pretrained(save_directory, **kwargs)

    @property
    def scaling(self) -> float:
        """Factor applied to every adapter expert's output."""
        return self.lora_alpha / self.r

    def resolved_num_experts(self, model_num_experts: int) -> int:
        """Adapter experts per block once the model is known (E: one per base expert)."""
        if self.variant == "E":
            return model_num_experts
        return self.num_experts if self.num_experts is not None else DEFAULT_NUM_EXPERTS[self.variant]

    def for_block(self, block_name: str) -> PerftConfig:
        """The configuration one MoE block uses: this one, with the block's rank where ``rank_pattern`` names it."""
        if not self.rank_pattern or block_name not in self.rank_pattern:
            return self
        block_config = copy.copy(self)
        block_config.r = self.rank_pattern[block_name]
        return block_config

    def experts_for(self, block_name: str) -> list[int] | None:
        """The base experts of one MoE block that get an adapter expert (sorted); None: all of them."""
        if self.target_experts is None:
            return None
        return self.target_experts.get(block_name, [])

    def resolved_top_k(self) -> int:
        """PERFT-R's number of active adapter experts per token."""
        return self.top_k if self.top_k is not None else min(DEFAULT_TOP_K_R, self.resolved_num_experts(0))

    @property
    def has_own_router(self) -> bool:
        """PERFT-R: the adapter trains a router of its own (a tensor, an aux loss, a routing to monitor)."""
        return self.variant == "R"

    @property
    def follows_base_routing(self) -> bool:
        """PERFT-E: the model's frozen router picks and weights the adapter experts, one per base expert."""
        return self.variant == "E"

    @property
    def is_routed(self) -> bool:
        """Each token reaches only some adapter experts (R, E); D and S apply every expert to every token."""
        return self.has_own_router or self.follows_base_routing

    def routed_top_k(self, model_top_k: int | None) -> int | None:
        """Adapter experts a routed variant picks per token (E: the model's top-k); None for D and S."""
        if self.has_own_router:
            return self.resolved_top_k()
        return model_top_k if self.follows_base_routing else None

    def active_experts_per_token(self, model_num_experts: int, model_top_k: int | None) -> int | None:
        """Adapter experts that compute on each token: the top-k of a routed variant, else all of them (None for
        E on a model whose top-k is unknown)."""
        if self.is_routed:
            return self.routed_top_k(model_top_k)
        return self.resolved_num_experts(model_num_experts)

    def trainable_parameters_per_block(self, hidden_size: int, model_num_experts: int, block_name: str = "") -> int:
        """Parameters this adapter trains in one MoE block: A (N, r, D) and B (N, D, r) for its N experts, plus
        PERFT-R's router (N, D). ``block_name`` picks the block's rank (``rank_pattern``) and, for selective
        PERFT-E, its selected experts (``target_experts``)."""
        block_config = self.for_block(block_name)
        selected = self.experts_for(block_name)
        num_experts = len(selected) if selected is not None else self.resolved_num_experts(model_num_experts)
        router = num_experts * hidden_size if self.has_own_router else 0
        return 2 * num_experts * block_config.r * hidden_size + router

    def _validate(self) -> None:
        """Fail early with the field name and what is allowed."""
        _require(self.variant in VARIANTS, "variant", self.variant, f"one of {', '.join(VARIANTS)}")
        _require(_is_int(self.r) and self.r > 0, "r", self.r, "a positive integer")
        _require(_is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "> 0")
        _require(
            _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)"
        )
        _require(self.adapter_type in ADAPTER_TYPES, "adapter_type", self.adapter_type, f"one of {ADAPTER_TYPES}")
        _require(
            _is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
            "router_aux_loss_coef",
            self.router_aux_loss_coef,
            ">= 0",
        )
        _require(
            _is_number(self.router_init_std) and self.router_init_std > 0,
            "router_init_std",
            self.router_init_std,
            "> 0",
        )
        self._validate_dispatch_backend()
        _require(isinstance(self.normalize_top_k, bool), "normalize_top_k", self.normalize_top_k, "True or False")
        _require(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "True or False")
        self._validate_module_selection()
        if self.num_experts is not None:
            _require(
                _is_int(self.num_experts) and self.num_experts > 0,
                "num_experts",
                self.num_experts,
                "a positive integer",
            )
        if self.top_k is not None:
            _require(_is_int(self.top_k) and self.top_k > 0, "top_k", self.top_k, "a positive integer")
        self._validate_variant_shape()
        self._validate_target_experts()
        ranks = self.rank_pattern
        _require(
            ranks is None
            or (isinstance(ranks, dict) and all(isinstance(b, str) and _is_int(r) and r > 0 for b, r in ranks.items())),
            "rank_pattern",
            self.rank_pattern,
            "None or a dict of MoE block name (e.g. 'model.layers.3.mlp') to a positive rank",
        )

    def _validate_target_experts(self) -> None:
        """Per block name, a list of expert indices (>= 0), and only for PERFT-E: the other variants do not have
        one adapter expert per base expert. Ranges and block names are checked against the model when injected."""
        experts = self.target_experts
        if experts is None:
            return
        _require(
            isinstance(experts, dict)
            and all(isinstance(block, str) and _is_list_of(indices, int) for block, indices in experts.items())
            and all(min(indices, default=0) >= 0 for indices in experts.values()),
            "target_experts",
            experts,
            "None or a dict of MoE block name (e.g. 'model.layers.3.mlp') to a list of expert indices (>= 0)",
        )
        if self.variant != "E":
            raise ValueError(
                f"PerftConfig.target_experts is set with variant={self.variant!r}: selecting base experts only means "
                f"something for PERFT-E, whose adapter experts pair with the base experts. Use variant='E', or drop "
                f"target_experts (num_experts sets the adapter experts of R and D)."
            )

    def _validate_dispatch_backend(self) -> None:
        """'auto' or a registered backend, so that a typo fails here and not at the first forward."""
        from .dispatch import available_backends

        choices = ["auto", *available_backends()]
        _require(self.dispatch_backend in choices, "dispatch_backend", self.dispatch_backend, f"one of {choices}")

    def _validate_module_selection(self) -> None:
        """peft's selection fields: names or a regex, layer indices, extra modules, token ids."""
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            _require(
                value is None or isinstance(value, str) or _is_list_of(value, str),
                name,
                value,
                "None, a string (regex) or a list of module names",
            )
        layers = self.layers_to_transform
        _require(
            layers is None
            or (_is_int(layers) and layers >= 0)
            or (_is_list_of(layers, int) and min(layers, default=0) >= 0),
            "layers_to_transform",
            layers,
            "None, a layer index or a list of layer indices (>= 0)",
        )
        _require(
            self.modules_to_save is None or _is_list_of(self.modules_to_save, str),
            "modules_to_save",
            self.modules_to_save,
            "None or a list of module names",
        )
        tokens = self.trainable_token_indices
        _require(
            tokens is None
            or _is_list_of(tokens, int)
            or (isinstance(tokens, dict) and all(_is_list_of(ids, int) for ids in tokens.values())),
            "trainable_token_indices",
            tokens,
            "None, a list of token ids or a dict of module name to token ids",
        )

    def _validate_variant_shape(self) -> None:
        """Check the combinations of variant, num_experts and top_k."""
        if self.variant == "S":
            _require(self.num_experts in (None, 1), "num_experts", self.num_experts, "1 (or None) for variant 'S'")
        if self.variant == "E":
            _require(
                self.num_experts is None, "num_experts", self.num_experts, "None for variant 'E' (it uses the model's)"
            )
        if self.variant != "R":
            _require(self.top_k is None, "top_k", self.top_k, f"None for variant {self.variant!r} (only R routes)")
            return
        num_experts = self.resolved_num_experts(0)
        if self.top_k is not None and self.top_k > num_experts:
            raise ValueError(
                f"PerftConfig.top_k={self.top_k} is larger than num_experts={num_experts}: PERFT-R picks top_k of "
                f"its num_experts adapter experts, so use top_k <= num_experts."
            )


def _is_bundled_model(name_or_path: str | None) -> bool:
    return bool(name_or_path) and Path(name_or_path).resolve() == BUNDLED_MODEL_PATH


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of(value: object, item_type: type) -> bool:
    """A list (or tuple, or set) whose items are all ``item_type`` (bools are not ints)."""
    return isinstance(value, (list, tuple, set)) and all(
        isinstance(item, item_type) and not isinstance(item, bool) for item in value
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition: bool, field_name: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"PerftConfig.{field_name}={value!r} is invalid: expected {allowed}.")
