"""Checks of command-line inputs shared by the ``peft-perft`` subcommands, run before anything heavy loads.

Each check raises `InputError` with one message that says what is wrong, where (the flag), and what to do; the
``peft-perft`` entry point prints it as one line and exits with status 2. Models and data sets named by Hub id
are looked up with one short request (or in the local cache), so an offline machine is told so in a second instead
of after a minute of retries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HUB_TIMEOUT_SECONDS = 10.0
CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
DATA_PEEK_BYTES = 4096
"""How much of a local data file is read to tell an empty one, before ``datasets`` reads it all."""
# A folder holding none of these has no tokenizer: Transformers then builds an empty one instead of failing, and the
# run ends much later in an IndexError from inside generate.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tekken.json",
)


class InputError(ValueError):
    """A command-line input that cannot work; the message is meant for the user as it is."""


def require_positive(value: float | None, flag: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    """``flag`` must be a positive number (or zero / unset where that means something)."""
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        expected = "zero or a positive number" if allow_zero else "a positive number"
        raise InputError(f"{flag} {value} is invalid: expected {expected}.")


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path: Hub ids are ``name`` or ``owner/name``, never more."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def require_model(name: str, flag: str = "--model") -> None:
    """A local model folder with config.json, or a Hub model id that is cached or reachable."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / CONFIG_FILE).is_file():
            raise InputError(f"{flag} {name} has no {CONFIG_FILE}: point it at a saved Transformers model folder.")
        return
    if looks_like_path(name):
        raise InputError(f"{flag} {name}: no such folder. Give an existing model folder or a Hub model id.")
    _require_on_hub(name, flag, "model", CONFIG_FILE)


def require_moe_model(name: str, flag: str = "--model") -> None:
    """The model at ``name`` (already checked by `require_model`) has a Mixture-of-Experts block PERFT can adapt.

    Read from its config alone: the model is built on the meta device (no weights, no memory) and searched with the
    same detector ``get_peft_model`` uses, so a dense model is refused before any weight loads or any data is built.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_perft.architectures import find_moe_blocks

    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not find_moe_blocks(model):
        raise InputError(
            f"{flag} {name} is a dense {config.model_type!r} model (no Mixture-of-Experts block): PERFT adapts the "
            f"MoE blocks of MoE models only. Pass an MoE model (OLMoE, Mixtral, Qwen-MoE, ...), or use LoRA for a "
            f"dense one."
        )


def require_tokenizer(name: str, flag: str) -> None:
    """A local folder with tokenizer files, or a Hub id whose tokenizer_config.json is cached or reachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            raise InputError(
                f"{flag} {name}: the model folder has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}...). Pass the "
                f"base model's tokenizer with --tokenizer (its folder or Hub id), or save it into the folder with "
                f"tokenizer.save_pretrained('{name}')."
            )
        return
    if looks_like_path(name):
        raise InputError(f"{flag} {name}: no such folder. Give an existing tokenizer folder or a Hub model id.")
    _require_on_hub(name, flag, "model", "tokenizer_config.json")


def require_dataset(name: str, flag: str = "--dataset", builtin: tuple[str, ...] = ()) -> None:
    """A built-in name, a local file or folder, or a Hub data set id that is reachable (or HF_HUB_OFFLINE is set)."""
    if name in builtin:
        return
    path = Path(name).expanduser()
    if path.exists():
        _require_examples(path, flag)
        return
    if looks_like_path(name) or Path(name).suffix.lower() in {".json", ".jsonl", ".parquet", ".csv"}:
        raise InputError(f"{flag} {name}: no such file or folder. Check the path, or give a Hub data set id.")
    _require_on_hub(name, flag, "dataset", None)


def _require_examples(path: Path, flag: str) -> None:
    """A local data file that holds no example at all (empty, only blank lines, or a JSON ``[]``) is named here, in
    one line, instead of failing inside the ``datasets`` builders with their own words."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        head = handle.read(DATA_PEEK_BYTES).lstrip()
    suffix = path.suffix.lower()
    whole_file_read = path.stat().st_size <= DATA_PEEK_BYTES
    empty = not head and whole_file_read
    if suffix == ".json" and head.startswith(b"["):
        empty = head[1:].lstrip().startswith(b"]")
    if empty:
        raise InputError(
            f"{flag} {path} holds no examples (the file is empty{' or an empty JSON list' if suffix == '.json' else ''}"
            f"). Give a file with at least one record, e.g. one JSON object per line in a .jsonl file."
        )


def require_adapter(name: str, flag: str = "--adapter") -> None:
    """A local adapter folder whose adapter_config.json parses, or a Hub adapter id that is cached or reachable."""
    path = Path(name).expanduser()
    if path.exists():
        config = path / ADAPTER_CONFIG_FILE
        if not config.is_file():
            raise InputError(f"{flag} {name} has no {ADAPTER_CONFIG_FILE}: point it at a folder save_pretrained wrote.")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise InputError(
                f"{flag}: {config} is not valid JSON ({error}); the adapter folder is damaged. Save the adapter "
                f"again or download it again."
            ) from None
        return
    if looks_like_path(name):
        raise InputError(f"{flag} {name}: no such folder. Give an existing adapter folder or a Hub adapter id.")
    _require_on_hub(name, flag, "model", ADAPTER_CONFIG_FILE)


def _require_on_hub(name: str, flag: str, repo_type: str, probe_file: str | None) -> None:
    """The id is valid and in the local cache, or the Hub answers for it; otherwise say why and what to do."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise InputError(f"{flag} {name} is neither an existing local path nor a valid Hub {repo_type} id.") from None
    if probe_file is not None and isinstance(try_to_load_from_cache(name, probe_file, repo_type=repo_type), str):
        return
    local_hint = f"or download it once and pass the local folder ({flag} path/to/{name.rsplit('/', 1)[-1]})"
    if constants.HF_HUB_OFFLINE:
        if repo_type == "dataset":
            return  # datasets reads its own cache offline; it says so itself if the data set is not there
        raise InputError(
            f"{flag} {name} is not in the local Hub cache and HF_HUB_OFFLINE is set: unset it {local_hint}."
        )
    api = HfApi()
    lookup = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        lookup(name, timeout=HUB_TIMEOUT_SECONDS)
    except GatedRepoError:
        raise InputError(
            f"{flag} {name} is gated on the Hub: accept its terms on huggingface.co and log in (`hf auth login`), "
            f"{local_hint}."
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{flag} {name}: no such {repo_type} on the Hugging Face Hub (or it is private: log in with "
            f"`hf auth login`). Check the id, or pass a local path."
        ) from None
    except Exception as error:  # noqa: BLE001 - any transport failure means the same thing to the user
        raise InputError(
            f"{flag} {name}: could not reach the Hugging Face Hub ({type(error).__name__}: {error}) and it is not in "
            f"the local cache. Connect to the internet, {local_hint}."
        ) from None
