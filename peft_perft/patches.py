"""Everything ``import peft_perft`` changes outside the package, in one list (`PATCHES`), installed by `install`.

peft learns a method through ``register_peft_method`` and its mappings; what that cannot express (a loading guard,
the PERFT model card, gathering a sharded adapter on save, PERFT-E under expert parallelism) is done here by
wrapping one peft function or method, or registering with a Transformers registry. Each `Patch` names the
attribute it changes, why, whether it can tell PERFT adapters from others (and why not where it cannot), and how
to undo it. Every wrapper carries the `INSTALLED` attribute, so installing twice (``importlib.reload``, the
autoload hook and an explicit import) wraps nothing twice; ``functools.wraps`` keeps peft's function as the
wrapper's ``__wrapped__``, which is how each wrapper is undone.

The wrappers themselves live with the code they serve (`loading`, `hub`, `parallel`); only this module and the
package ``__init__``, which calls `install`, wire them in.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import PerftConfig, perft_peft_type
from .hub.model_card import pushing_saved_folder, with_perft_card
from .layer import PerftMoeBlock
from .loading import atomic_for_perft, guard_config_reading, guard_weight_loading
from .model import PerftModel
from .parallel.expert_parallel import install_expert_parallel
from .parallel.replication import local_shard
from .parallel.saving import saving_gathered_adapter

INSTALLED = "__perft_patch__"
"""The one marker: an attribute set to True on every wrapper this module installs."""


@dataclass(frozen=True)
class Patch:
    """One change to a dependency: the attribute ``targets[0]`` (``module:attribute.path``) is replaced by
    ``wrap(original)``, or, where ``wrap`` is None, ``register`` adds entries to the ``targets`` (registries)."""

    targets: tuple[str, ...]
    why: str
    perft_only: str
    undo: str
    wrap: Callable[[Callable], Callable] | None = None
    register: Callable[[], None] | None = None


def _register_perft_method() -> None:
    """``PeftType.PERFT`` and peft's three mappings; a re-import points them at the fresh classes."""
    peft_type = perft_peft_type()
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = PerftConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = PerftModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PerftModel.prefix
    else:
        register_peft_method(name="perft", config_cls=PerftConfig, model_cls=PerftModel, prefix=PerftModel.prefix)


def _define_the_grouped_mm_operator() -> None:
    """Importing `dispatch.grouped` defines ``peft_perft::grouped_mm`` (once per process)."""
    importlib.import_module("peft_perft.dispatch.grouped")


def _give_the_block_sharded_init() -> None:
    """The core block initialises DTensor adapters through `parallel.local_shard` without importing `parallel`."""
    PerftMoeBlock.local_shard = staticmethod(local_shard)


PATCHES: tuple[Patch, ...] = (
    Patch(
        targets=("peft.utils.peft_types:PeftType",),
        why="peft's enum has no open registration; PERFT adds its member so that configs say peft_type 'PERFT'.",
        perft_only="Adds one member; no other member changes.",
        undo="Not undoable in a running process (an enum member cannot be removed); start Python without it.",
        register=perft_peft_type,
    ),
    Patch(
        targets=(
            "peft.mapping:PEFT_TYPE_TO_CONFIG_MAPPING",
            "peft.mapping:PEFT_TYPE_TO_TUNER_MAPPING",
            "peft.mapping:PEFT_TYPE_TO_PREFIX_MAPPING",
        ),
        why="peft's own registration (register_peft_method): get_peft_model and from_pretrained find PERFT.",
        perft_only="Adds the PERFT entries only.",
        undo="Delete the PeftType.PERFT key from the three mappings.",
        register=_register_perft_method,
    ),
    Patch(
        targets=("peft.peft_model:load_peft_weights",),
        why="Refuse a PERFT folder without weights or with pickle-only weights (no unpickling by default), and "
        "name the file when safetensors weights are truncated or corrupt.",
        perft_only="The missing and pickle checks read adapter_config.json and apply to PERFT folders only. A damaged "
        "safetensors file is reported for every method (DamagedAdapterError, a ValueError, naming the file): the "
        "weights cannot be read, so nothing else changes.",
        undo="peft.peft_model.load_peft_weights = peft.peft_model.load_peft_weights.__wrapped__",
        wrap=guard_weight_loading,
    ),
    Patch(
        targets=("peft.config:PeftConfigMixin.from_json_file",),
        why="Name the adapter_config.json that is not valid JSON, and say what to do.",
        perft_only="Every method: a file that is not JSON cannot say which method it belongs to. Only the error "
        "changes (DamagedAdapterError, a ValueError like json's); a readable file is read unchanged.",
        undo="PeftConfigMixin.from_json_file = classmethod(PeftConfigMixin.from_json_file.__func__.__wrapped__)",
        wrap=guard_config_reading,
    ),
    Patch(
        targets=("peft.peft_model:safe_save_file",),
        why="Write PERFT weights to a temporary file and rename it into place, so a failed save keeps the old file.",
        perft_only="State dicts holding PERFT tensors only; any other goes to safetensors' save_file unchanged.",
        undo="peft.peft_model.safe_save_file = peft.peft_model.safe_save_file.__wrapped__",
        wrap=atomic_for_perft,
    ),
    Patch(
        targets=("peft.peft_model:PeftModel.create_or_update_model_card",),
        why="Write the PERFT model card (README.md) before peft adds its metadata to it.",
        perft_only="Models holding a PERFT adapter only; others run peft's code unchanged.",
        undo="PeftModel.create_or_update_model_card = PeftModel.create_or_update_model_card.__wrapped__",
        wrap=with_perft_card,
    ),
    Patch(
        targets=("peft.peft_model:PeftModel.push_to_hub",),
        why="Upload exactly the folder save_pretrained writes (Transformers' method replaces the README).",
        perft_only="Models holding a PERFT adapter only; others run Transformers' method unchanged.",
        undo="PeftModel.push_to_hub = PeftModel.push_to_hub.__wrapped__",
        wrap=pushing_saved_folder,
    ),
    Patch(
        targets=("peft.peft_model:PeftModel.save_pretrained",),
        why="In a multi-process run, gather only the adapter's tensors on every rank (peft gathers the whole model).",
        perft_only="Models holding a PERFT adapter only; others run peft's code unchanged.",
        undo="PeftModel.save_pretrained = PeftModel.save_pretrained.__wrapped__",
        wrap=saving_gathered_adapter,
    ),
    Patch(
        targets=("transformers.distributed.expert_parallel:EPImplementationInterface",),
        why="Register PerftExpertParallel as ep_implementation='perft' (PERFT-E sharded like the experts).",
        perft_only="A new name in Transformers' registry; models choose it explicitly.",
        undo="Remove the 'perft' entry from EPImplementationInterface's registry.",
        register=install_expert_parallel,
    ),
    Patch(
        targets=(
            "torch.library:_defs",
            "torch.library:_impls",
            "torch._library.custom_ops:OPDEF_TO_LIB",
            "torch.jit._builtins:_builtin_table",
        ),
        why="torch.compile sees PERFT's grouped multiply as one opaque operator with a static output shape "
        "(torch 2.13's compile-time kernel for _grouped_mm takes bf16 only).",
        perft_only="A new operator in PERFT's own namespace, peft_perft::grouped_mm; no existing operator changes.",
        undo="Not undoable in a running process (torch keeps defined operators); nothing else calls it.",
        register=_define_the_grouped_mm_operator,
    ),
    Patch(
        targets=("peft_perft.layer:PerftMoeBlock.local_shard",),
        why="The core block initialises sharded (DTensor) adapters without importing the parallel layouts.",
        perft_only="PERFT's own class.",
        undo="Not needed: only PERFT blocks read it.",
        register=_give_the_block_sharded_init,
    ),
)


def install() -> None:
    """Apply every patch of `PATCHES` (idempotent: a wrapper already in place is kept)."""
    for patch in PATCHES:
        if patch.wrap is None:
            patch.register()
        else:
            _wrap_once(patch.targets[0], patch.wrap)


def _wrap_once(target: str, wrap: Callable[[Callable], Callable]) -> None:
    owner_path, attribute = _owner_path(target)
    owner = _resolve(owner_path)
    current = inspect.getattr_static(owner, attribute)
    is_classmethod = isinstance(current, classmethod)
    function = current.__func__ if is_classmethod else current
    if getattr(function, INSTALLED, False):
        return
    wrapper = wrap(function)
    setattr(wrapper, INSTALLED, True)
    setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def _owner_path(target: str) -> tuple[str, str]:
    """``"peft.peft_model:PeftModel.push_to_hub"`` -> ``("peft.peft_model:PeftModel", "push_to_hub")``."""
    module, _, attributes = target.partition(":")
    *owner, attribute = attributes.split(".")
    return (":".join([module, ".".join(owner)]) if owner else module), attribute


def _resolve(path: str) -> object:
    module, _, attributes = path.partition(":")
    owner = importlib.import_module(module)
    for name in filter(None, attributes.split(".")):
        owner = getattr(owner, name)
    return owner
