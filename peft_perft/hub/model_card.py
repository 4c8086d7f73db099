"""The model card (README.md) of a PERFT adapter, written from `model_cards/perft_adapter.md` on save and push.

peft writes an adapter's README through `PeftModel.create_or_update_model_card`, which builds a generic card when
README.md is missing and otherwise only updates its metadata. For a model holding a PERFT adapter we write the
PERFT card from our template just before that step, so peft then adds its usual metadata (library name, tags,
base model, PEFT version) to our card; a ``base_model`` that is a local path, which the Hub would reject, is
dropped from the metadata. `PeftModel.push_to_hub` is transformers' generic method, which replaces
the README with a card fetched from the Hub after saving; for PERFT models it instead uploads exactly the folder
`save_pretrained` writes. Both hooks leave every other peft model untouched; `peft_perft.patches` installs them
when the package is imported.

Training data, evaluation results and the routing monitor's summary are not known to the model; attach them with
`set_card_details(model, ...)` before saving or pushing, or write a card at any time with `write_model_card`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.resources
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel

from ..architectures import global_shape
from ..config import PerftConfig
from ..layer import PerftMoeBlock

TEMPLATE_NAME = "perft_adapter.md"
CARD_FILE = "README.md"
CARD_MARKER = "<!-- peft-perft model card:"
CARD_TAGS = ("peft", "perft", "moe", "mixture-of-experts")
MISSING_INFORMATION = "[More Information Needed]"
DETAILS_ATTRIBUTE = "perft_card_details"
# The Hub repository being pushed to, so that the card's loading snippet names it.
_pushing_to: contextvars.ContextVar[str | None] = contextvars.ContextVar("perft_pushing_to", default=None)

VARIANT_NAMES = {
    "R": "routed: adapter experts behind their own trainable router",
    "E": "embedded: one adapter expert per base expert, routed by the model's own router",
    "D": "dense: several always-active adapter experts",
    "S": "single: one always-active adapter expert",
}
ADAPTER_TYPE_NAMES = {
    "lora": "lora (linear bottleneck: B A h)",
    "parallel_adapter": "parallel_adapter (B SiLU(A h))",
}


@dataclass
class CardDetails:
    """What only the user knows about an adapter; each part shows up in the card when it is set.

    ``evaluation`` accepts Markdown text, an object with a ``to_markdown()`` method (such as
    `peft_perft.evaluation.EvaluationReport`, whose protocol the card then states) or a mapping rendered as a
    two-column table; ``evaluation_protocol`` says how other results were measured. ``routing_summary``
    accepts the same or a `peft_perft.monitor.RoutingReport` (e.g. ``RoutingMonitorCallback.report()``).
    """

    training_data: str | None = None
    datasets: Sequence[str] = ()
    evaluation: Any = None
    evaluation_protocol: str | None = None
    routing_summary: Any = None
    extra_tags: Sequence[str] = field(default_factory=tuple)


def template_path() -> Path:
    """The card template: `model_cards/` of a source checkout, or its copy inside an installed wheel."""
    checkout_copy = Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME
    if checkout_copy.is_file():
        return checkout_copy
    installed_copy = importlib.resources.files("peft_perft") / "model_cards" / TEMPLATE_NAME
    if installed_copy.is_file():
        return Path(str(installed_copy))
    raise FileNotFoundError(
        f"The PERFT model card template {TEMPLATE_NAME} is missing: looked in {checkout_copy} and in the installed "
        f"package (peft_perft/model_cards/). Reinstall peft-perft, or run from a checkout that has model_cards/."
    )


def perft_adapter_names(model: PeftModel) -> list[str]:
    """Names of the model's PERFT adapters (empty for any other peft model)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return []
    return [name for name, config in configs.items() if isinstance(config, PerftConfig)]


def set_card_details(model: PeftModel, **details: Any) -> CardDetails:
    """Attach training data, datasets, evaluation results or a routing summary to the model's future cards.

    Keyword arguments are the fields of `CardDetails`; fields not given keep their previous value.
    """
    known = sorted(CardDetails.__dataclass_fields__)
    unknown = sorted(set(details) - set(known))
    if unknown:
        raise TypeError(f"set_card_details got unknown field(s) {unknown}; the card takes {known}.")
    merged = replace(card_details(model), **details)
    object.__setattr__(model, DETAILS_ATTRIBUTE, merged)
    return merged


def card_details(model: PeftModel) -> CardDetails:
    """The details attached with `set_card_details` (empty when none were)."""
    return model.__dict__.get(DETAILS_ATTRIBUTE) or CardDetails()


def render_model_card(
    model: PeftModel,
    adapter_id: str | None = None,
    details: CardDetails | None = None,
    previous: ModelCard | None = None,
) -> ModelCard:
    """Build the PERFT card of ``model`` from the template; metadata of ``previous`` (an older card) is kept."""
    names = perft_adapter_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} holds no PERFT adapter (adapters: {list(getattr(model, 'peft_config', {}))}); "
            f"the PERFT model card describes PERFT adapters only."
        )
    details = details or card_details(model)
    base_model_id = _base_model_id(model, names[0])
    adapter_parameters = _adapter_parameter_count(model)
    base_parameters = sum(global_shape(parameter).numel() for parameter in model.parameters()) - adapter_parameters
    card_data = _card_data(previous, base_model_id, details, [model.peft_config[name].variant for name in names])
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"PERFT-{model.peft_config[names[0]].variant} adapter for {_display_name(base_model_id)}",
        base_model_link=_link(base_model_id),
        base_model_id=_published_id(base_model_id, "path/to/") if base_model_id else "path/to/base-model",
        adapter_id=_published_id(adapter_id, "path/to/") if adapter_id else "path/to/this/adapter",
        adapters=[_describe_adapter(model, name, base_parameters) for name in names],
        training_data=details.training_data or MISSING_INFORMATION,
        evaluation=_evaluation_markdown(details),
        routing_summary=_routing_markdown(details.routing_summary),
        perft_version=_perft_version(),
    )


def write_model_card(model: PeftModel, save_directory: str | Path, adapter_id: str | None = None) -> Path:
    """Write (or refresh) the PERFT card as ``save_directory/README.md``; return its path.

    An existing card's metadata is kept; its text is replaced only if it is a PERFT card or missing, so a card
    written by hand survives. Use this after the fact, e.g. once evaluation results are known.
    """
    path = Path(save_directory) / CARD_FILE
    previous = ModelCard.load(path) if path.is_file() else None
    if previous is not None and CARD_MARKER not in previous.text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    card = render_model_card(model, adapter_id=adapter_id, previous=previous)
    card.save(path)
    return path


def add_card_tags(path: Path, tags: Sequence[str]) -> None:
    """Make sure the card at ``path`` carries ``tags`` (peft replaces the tag list with its own)."""
    card = ModelCard.load(path)
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    card.save(path)


def drop_local_base_model(path: Path) -> None:
    """Remove a ``base_model`` that is a local path (and peft's matching tag) from the card's metadata.

    peft records whatever the base was loaded from; the Hub only accepts repo ids there and rejects the whole
    README otherwise, which would make `push_to_hub` fail for a base loaded from a local folder. The card's text
    names only the folder's name, as ``path/to/<name>`` in its loading snippet.
    """
    card = ModelCard.load(path)
    base_model = card.data.base_model
    names = [base_model] if isinstance(base_model, str) else list(base_model or [])
    if all(_is_hub_id(name) for name in names):
        return
    card.data.base_model = None
    card.data.tags = [tag for tag in card.data.tags or [] if tag not in {f"base_model:adapter:{n}" for n in names}]
    card.save(path)


def with_perft_card(create_or_update: Callable) -> Callable:
    """Wrap peft's card step: write the PERFT card first, let peft update it, then restore the PERFT tags."""

    @functools.wraps(create_or_update)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        names = perft_adapter_names(self)
        if names:
            write_model_card(self, output_dir, adapter_id=_pushing_to.get())
        create_or_update(self, output_dir)
        if names:
            variants = [self.peft_config[name].variant for name in names]
            add_card_tags(Path(output_dir) / CARD_FILE, _tags(card_details(self), *variants))
            drop_local_base_model(Path(output_dir) / CARD_FILE)

    return create_or_update_model_card


def pushing_saved_folder(push_to_hub: Callable) -> Callable:
    """Wrap `push_to_hub`: a PERFT model uploads exactly what `save_pretrained` writes, README included."""

    @functools.wraps(push_to_hub)
    def push_perft_adapter(
        self: PeftModel,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        if not perft_adapter_names(self):
            return push_to_hub(
                self,
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                max_shard_size=max_shard_size,
                tags=tags,
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder, _pushing(repo_id):
            self.save_pretrained(folder)
            if tags:
                add_card_tags(Path(folder) / CARD_FILE, tags)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    return push_perft_adapter


@contextlib.contextmanager
def _pushing(repo_id: str) -> Iterator[None]:
    token = _pushing_to.set(repo_id)
    try:
        yield
    finally:
        _pushing_to.reset(token)


def _describe_adapter(model: PeftModel, name: str, base_parameters: int) -> dict[str, Any]:
    """The words, settings table and parameter count of one PERFT adapter."""
    config: PerftConfig = model.peft_config[name]
    blocks = [module for module in model.modules() if isinstance(module, PerftMoeBlock) and name in module.perft_A]
    if not blocks:
        raise ValueError(f"Adapter {name!r} has no adapted MoE block in this model, so there is nothing to describe.")
    spec = blocks[0].spec
    num_experts = global_shape(blocks[0].perft_A[name])[0]
    active = config.active_experts_per_token(num_experts, spec.top_k)
    # Counted from the adapter's own tensors (global sizes for sharded ones): asking peft for the adapter state dict
    # here would gather sharded weights on the main process alone and leave the other ranks of a save waiting.
    saved = sum(global_shape(tensor).numel() for block in blocks for tensor in _adapter_tensors(block, name))
    settings = [
        ("variant", f"{config.variant} ({VARIANT_NAMES[config.variant]})"),
        ("adapter experts per MoE block", num_experts),
        ("active adapter experts per token", active if active is not None else "as the base model's top-k"),
        ("rank r", config.r),
        ("adapter type", ADAPTER_TYPE_NAMES[config.adapter_type]),
        ("scaling lora_alpha / r", f"{config.lora_alpha} / {config.r} = {config.scaling:g}"),
        ("dropout", config.lora_dropout),
        ("adapted MoE blocks", f"{len(blocks)} (hidden size {spec.hidden_size})"),
    ]
    if config.has_own_router:
        settings += [
            ("top-k weights renormalised", config.normalize_top_k),
            ("router load-balancing loss weight", config.router_aux_loss_coef),
        ]
    description = _variant_description(config, num_experts, active, len(blocks))
    if config.rank_pattern:
        ranks = [f"{block.block_name}: {block.perft_configs[name].r}" for block in blocks]
        more = f"; ... {len(ranks) - _LISTED_BLOCKS} more" if len(ranks) > _LISTED_BLOCKS else ""
        settings.append(("rank per MoE block (rank_pattern)", "; ".join(ranks[:_LISTED_BLOCKS]) + more))
    if config.target_experts is not None:
        settings[1:2] = _selection_settings(config, blocks)
        description += _SELECTIVE_WORDS
    return {
        "name": name,
        "variant": config.variant,
        "description": description,
        "settings": settings,
        "trainable_parameters": f"{saved:,}",
        # As peft's print_trainable_parameters and the peft-perft CLIs count: trainable / (base + this adapter).
        "all_parameters": f"{base_parameters + saved:,}",
        "trainable_share": f"{100 * saved / (base_parameters + saved):.2f}%",
    }


_SELECTIVE_WORDS = (
    " Only the selected base experts listed below have an adapter expert (selective PERFT-E): a token routed to "
    "another expert gets nothing from the adapter for that expert, and MoE blocks with no selected expert are "
    "left as they are."
)
_LISTED_BLOCKS = 8


def _selection_settings(config: PerftConfig, blocks: list[PerftMoeBlock]) -> list[tuple[str, Any]]:
    """Selective PERFT-E's rows of the settings table: which base experts are adapted, and how they were chosen."""
    counts = {block.block_name: len(config.experts_for(block.block_name)) for block in blocks}
    total = sum(block.spec.num_experts for block in blocks)
    listed = "; ".join(f"{name}: {config.experts_for(name)}" for name in list(counts)[:_LISTED_BLOCKS])
    more = f"; ... {len(counts) - _LISTED_BLOCKS} more in adapter_config.json" if len(counts) > _LISTED_BLOCKS else ""
    return [
        ("adapter experts per MoE block", f"{min(counts.values())} to {max(counts.values())} (selected)"),
        ("adapted base experts", f"{sum(counts.values())} of {total} in the adapted blocks: {listed}{more}"),
        ("experts chosen by", config.target_experts_source or "given by hand (target_experts)"),
    ]


def _variant_description(config: PerftConfig, num_experts: int, active: int | None, num_blocks: int) -> str:
    """The PERFT configuration in words, as the paper describes each variant."""
    expert = f"rank-{config.r} bottleneck (down-projection A, up-projection B{_activation_words(config)})"
    where = f"in each of the {num_blocks} adapted MoE blocks"
    if config.has_own_router:
        return (
            f"{num_experts} adapter experts, each a {expert}, sit beside the frozen experts {where}. A new trainable "
            f"router scores them for every token and sends the token to its top-{active}; their weighted outputs "
            f"are added to the block's output. The router learns its own split of the work."
        )
    if config.follows_base_routing:
        return (
            f"Every base expert gets its own adapter expert, a {expert}, {where} ({num_experts} per block). The "
            f"model's frozen router picks and weights them: a token that goes to base expert i with weight g also "
            f"goes to adapter expert i with weight g, so the adapter follows the model's own routing."
        )
    if num_experts > 1:
        return (
            f"{num_experts} adapter experts, each a {expert}, are applied to every token {where}, without routing; "
            f"their summed output is added to the block's output."
        )
    return f"One adapter expert, a {expert}, is applied to every token {where}; its output is added to the block's."


def _activation_words(config: PerftConfig) -> str:
    return ", SiLU between them" if config.adapter_type == "parallel_adapter" else ", no activation"


def _adapter_parameter_count(model: PeftModel) -> int:
    """Parameters held by every PERFT adapter of the model (to separate them from the base model's)."""
    return sum(
        global_shape(parameter).numel()
        for module in model.modules()
        if isinstance(module, PerftMoeBlock)
        for parameters in (module.perft_A, module.perft_B, module.perft_router)
        for parameter in parameters.values()
    )


def _adapter_tensors(block: PerftMoeBlock, name: str) -> list[torch.Tensor]:
    return [tensors[name] for tensors in (block.perft_A, block.perft_B, block.perft_router) if name in tensors]


def _base_model_id(model: PeftModel, adapter_name: str) -> str | None:
    """The base model's Hub id or path, as peft records it in adapter_config.json."""
    recorded = model.peft_config[adapter_name].base_model_name_or_path
    if recorded:
        return recorded
    return getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None) or None


def _card_data(
    previous: ModelCard | None, base_model_id: str | None, details: CardDetails, variants: list[str]
) -> ModelCardData:
    """Metadata: the previous card's, plus what the Hub needs to list this as a PERFT adapter of its base."""
    data = ModelCardData(**(previous.data.to_dict() if previous is not None else {}))
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | set(_tags(details, *variants)))
    if base_model_id and _is_hub_id(base_model_id):
        data.base_model = base_model_id
    if details.datasets:
        data.datasets = sorted(set(data.datasets or []) | set(details.datasets))
    return data


def _tags(details: CardDetails, *variants: str) -> list[str]:
    return [*CARD_TAGS, *(f"perft-{variant.lower()}" for variant in variants), *details.extra_tags]


def _is_hub_id(name: str) -> bool:
    """A name the Hub accepts as a model repo id, and not a folder on this machine."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def _display_name(model_id: str | None) -> str:
    """The Hub id, or only the folder's name for a local base: a card must not publish paths of this machine."""
    if not model_id:
        return "an MoE model"
    return model_id if _is_hub_id(model_id) else Path(model_id).name


def _published_id(name: str, placeholder_prefix: str) -> str:
    """A Hub id as it is; a local path as ``path/to/<its folder name>``, for the reader to fill in."""
    return name if _is_hub_id(name) else f"{placeholder_prefix}{Path(name).name or 'model'}"


def _link(model_id: str | None) -> str:
    if not model_id:
        return "it was trained on"
    if not _is_hub_id(model_id):
        return f"`{_display_name(model_id)}` (a local model when this adapter was saved)"
    return f"[`{model_id}`](https://huggingface.co/{model_id})"


def _evaluation_markdown(details: CardDetails) -> str:
    """The attached results, preceded by how they were measured."""
    if details.evaluation is None:
        return MISSING_INFORMATION
    results = _as_markdown(details.evaluation, ("metric", "value"))
    protocol = details.evaluation_protocol or _report_protocol(details.evaluation)
    return f"**Protocol:** {protocol or MISSING_INFORMATION + ' (how these results were measured)'}\n\n{results}"


def _report_protocol(report: Any) -> str | None:
    """The protocol of a `peft_perft.evaluation.EvaluationReport`, from the settings it records."""
    metadata = getattr(report, "metadata", None)
    if not isinstance(metadata, Mapping) or "generation" not in metadata:
        return None
    generation = metadata["generation"]
    beams = generation.get("num_beams", 1)
    decoding = "greedy decoding" if beams == 1 else f"beam search with {beams} beams"
    new_tokens = generation.get("max_new_tokens") or "each task's default (32 commonsense, 256 arithmetic)"
    samples = metadata.get("max_samples")
    source = metadata.get("data_source")
    return (
        f"`peft-perft eval` (the PERFT paper's LLM-Adapters prompts and answer rules), {decoding}, max new tokens "
        f"{new_tokens}, {'every record' if samples is None else f'the first {samples} records'} of each task"
        + (f", test data `{_display_name(str(source))}`" if source else "")
        + "; accuracy is the share of exactly matched answers, the average the mean over tasks."
    )


def _routing_markdown(summary: Any) -> str:
    """The routing monitor's `RoutingReport` as one row per router, or any other summary as given."""
    from ..monitor import RoutingReport

    if not isinstance(summary, RoutingReport):
        return _as_markdown(summary, ("router", "summary"))
    if summary.empty:
        return MISSING_INFORMATION
    rows = [
        f"| {stats.layer} | {stats.label} | {stats.num_experts} | {stats.top_k or '-'} | {stats.tokens:,.0f} | "
        f"{stats.entropy:.3f} | {stats.max_load:.3f} | {len(stats.dead_experts)} |"
        for stats in summary.routers
    ]
    header = [
        f"Measured by `peft_perft.monitor` over {summary.forward_passes} forward passes. Load is the fraction of "
        f"tokens an expert received; entropy is 1 for a perfectly even spread and 0 for a single expert.",
        "",
        "| layer | router | experts | top-k | tokens | entropy | max load | unused experts |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(header + rows)


def _as_markdown(value: Any, headers: tuple[str, str]) -> str:
    """Card text for a detail: as given, through its ``to_markdown()``, or a table of a mapping."""
    if value is None:
        return MISSING_INFORMATION
    if hasattr(value, "to_markdown"):
        return value.to_markdown().strip()
    if isinstance(value, Mapping):
        rows = [f"| {key} | {_format_value(item)} |" for key, item in value.items()]
        return "\n".join([f"| {headers[0]} | {headers[1]} |", "| --- | ---: |", *rows])
    return str(value).strip()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_format_value(item)}" for key, item in value.items())
    return str(value)


def _perft_version() -> str:
    """The installed package's version, read from its metadata rather than by importing the package's ``__init__``."""
    return importlib.metadata.version("peft-perft")
