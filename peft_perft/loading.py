"""Save and load protections: an adapter either fits the model exactly or is refused before any tensor is copied.

Loading refuses pickle-based ``adapter_model.bin`` files for PERFT adapters unless the user opts in, so that loading
never unpickles anything by default. A damaged ``adapter_config.json`` (not JSON) or weights file (truncated or
corrupt safetensors) is reported with the file's path and what is wrong with it, for every peft adapter. Saving a
PERFT adapter writes the weights to a temporary file and renames it into place, so a save that fails halfway leaves
the previous file intact. `peft_perft.patches` installs these wrappers in peft.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .architectures import WHOLE_SHAPE_ATTRIBUTE

ALLOW_PICKLE_ENV = "PEFT_PERFT_ALLOW_PICKLE"
ADAPTER_KEY_MARKERS = (".perft_A.", ".perft_B.", ".perft_router.")
SAFETENSORS_NAME = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a model of another shape (hidden size, expert count, layers or targets)."""


class DamagedAdapterError(ValueError):
    """A file of a saved adapter cannot be read: its configuration is not JSON, or its weights are cut or corrupt."""


def check_adapter_fits(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Compare the adapter's PERFT tensors with the model's slots for ``adapter_name``; raise on any difference."""
    own_suffix = f".{adapter_name}"
    expected = {
        key: tuple(getattr(value, WHOLE_SHAPE_ATTRIBUTE, value.shape))
        for key, value in model.state_dict(keep_vars=True).items()
        if _is_perft_key(key) and key.endswith(own_suffix)
    }
    found = {key: tuple(value.shape) for key, value in state_dict.items() if _is_perft_key(key)}
    problems = [
        f"{key}: the model expects shape {expected[key]}, the adapter has {found[key]}"
        for key in sorted(expected.keys() & found.keys())
        if expected[key] != found[key]
    ]
    problems += [
        f"{key}: missing from the adapter (expected shape {expected[key]})"
        for key in sorted(expected.keys() - found.keys())
    ]
    problems += [
        f"{key}: in the adapter but the model has no such MoE block" for key in sorted(found.keys() - expected.keys())
    ]
    if problems:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise AdapterMismatchError(
            f"The PERFT adapter {adapter_name!r} does not fit this base model, so nothing was loaded:\n  {listed}\n"
            f"Load it onto the base model it was trained with (its adapter_config.json names it in "
            f"base_model_name_or_path); hidden size, expert count and MoE layers must match."
        )


def guard_weight_loading(load_weights: Callable) -> Callable:
    """Wrap peft's weight loader: a local PERFT adapter without weights gets a clear error, and one stored only as
    pickle is refused unless the user allows it."""

    @functools.wraps(load_weights)
    def load_checked(model_id: str, *args, **kwargs):
        folder = Path(model_id, kwargs.get("subfolder") or "")
        if _lacks_weights(folder):
            raise FileNotFoundError(
                f"{folder} holds a PERFT adapter_config.json but no adapter_model.safetensors: the save did not "
                f"finish or the file was removed. Save the adapter again, or point to a complete adapter folder."
            )
        if _only_pickle_weights(folder) and os.environ.get(ALLOW_PICKLE_ENV) != "1":
            raise PermissionError(
                f"{folder / 'adapter_model.bin'} is a pickle file; PERFT loads adapters from safetensors only. "
                f"If you trust its origin, convert it to adapter_model.safetensors, or set {ALLOW_PICKLE_ENV}=1 "
                f"to load it anyway."
            )
        try:
            return load_weights(model_id, *args, **kwargs)
        except SafetensorError as error:
            weights = folder / SAFETENSORS_NAME if folder.is_dir() else f"the {SAFETENSORS_NAME} of {model_id}"
            raise DamagedAdapterError(
                f"{weights} is damaged ({error}): the file is truncated or corrupt, e.g. by an interrupted save or "
                f"download. Save the adapter again, or delete the file and download it again."
            ) from None

    return load_checked


def guard_config_reading(from_json_file: Callable) -> Callable:
    """Wrap peft's adapter_config.json reader: a file that is not JSON is named, with what is wrong with it."""

    @functools.wraps(from_json_file)
    def read_checked(cls: type, path_json_file: str, **kwargs):
        try:
            return from_json_file(cls, path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DamagedAdapterError(
                f"{path_json_file} is not valid JSON ({error}): the adapter's configuration is damaged. Save the "
                f"adapter again, or download it again."
            ) from None

    return read_checked


def atomic_for_perft(save_file: Callable) -> Callable:
    """Wrap safetensors' ``save_file`` as peft calls it: a state dict holding PERFT tensors is saved atomically
    (`save_atomically`), any other goes to ``save_file`` unchanged, so other methods write what peft writes."""

    @functools.wraps(save_file)
    def save_checked(tensors: dict[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
        if not any(_is_perft_key(key) for key in tensors):
            return save_file(tensors, filename, metadata=metadata)
        return save_atomically(tensors, filename, metadata)

    return save_checked


def save_atomically(tensors: dict[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
    """Write safetensors next to ``filename`` first and rename it into place only once complete."""
    partial = f"{filename}.partial"
    try:
        _write_tensors(tensors, partial, metadata)
        os.replace(partial, filename)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _write_tensors(tensors: dict[str, torch.Tensor], filename: str, metadata: dict | None) -> None:
    save_file(tensors, filename, metadata=metadata)


def _lacks_weights(folder: Path) -> bool:
    """A local PERFT adapter folder without any weights file."""
    names = (SAFETENSORS_NAME, "adapter_model.bin")
    return not any((folder / name).exists() for name in names) and _is_local_perft_adapter(folder)


def _only_pickle_weights(folder: Path) -> bool:
    """A local PERFT adapter folder whose weights exist only as a pickle file."""
    has_pickle = (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists()
    return has_pickle and _is_local_perft_adapter(folder)


def _is_local_perft_adapter(folder: Path) -> bool:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()).get("peft_type") == "PERFT"
    except (OSError, ValueError):
        return False


def _is_perft_key(key: str) -> bool:
    return any(marker in f"{key}." for marker in ADAPTER_KEY_MARKERS)
