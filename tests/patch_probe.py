"""Run in a fresh interpreter by tests/test_patches.py: what ``import peft_perft`` changes in its dependencies.

Argument: a JSON list of the modules (not peft_perft's) that importing peft_perft loads; they are imported first,
so that the only changes left between the two snapshots are the ones peft_perft makes. Prints, as JSON, each
changed, added or mutated (dict, list, set) attribute of those modules and of the classes they define, as
``module:attribute`` or ``module:Class.attribute``.
"""

from __future__ import annotations

import importlib
import json
import sys
from types import ModuleType

SCOPE = ("peft", "transformers", "trl", "accelerate", "safetensors", "huggingface_hub", "torch", "datasets")


def snapshot() -> tuple[dict[str, int], dict[int, tuple[str, int]]]:
    """Identity of every attribute, and size of every container, keyed by where it is found."""
    bindings, containers = {}, {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in SCOPE:
            continue
        # A lazy module (Transformers' _LazyModule) fills its own namespace on first access: not a patch.
        namespaces = [] if type(module) is not ModuleType else [(f"{name}:", vars(module))]
        namespaces += [
            (f"{name}:{value.__qualname__}.", vars(value))
            for value in list(vars(module).values())
            if isinstance(value, type) and value.__module__ == name
        ]
        for owner, namespace in namespaces:
            for attribute, value in list(namespace.items()):
                bindings[owner + attribute] = id(value)
                if isinstance(value, (dict, list, set)):
                    containers.setdefault(id(value), (owner + attribute, len(value)))
    return bindings, containers


def _owner(path: str) -> str:
    """``module:`` for a module attribute, ``module:Class`` for a class attribute."""
    module, _, attribute = path.partition(":")
    return f"{module}:{attribute.rpartition('.')[0]}"


def main() -> None:
    for name in json.loads(sys.argv[1]):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module listed by a package's import but not importable on its own
            continue
    bindings, containers = snapshot()
    import peft_perft  # noqa: F401

    after_bindings, after_containers = snapshot()
    changed = {path for path, identity in after_bindings.items() if bindings.get(path, identity) != identity}
    owners = {_owner(path) for path in bindings}
    added = {path for path in after_bindings.keys() - bindings.keys() if _owner(path) in owners}
    mutated = {path for key, (path, size) in containers.items() if after_containers[key][1] != size}
    print(json.dumps(sorted(changed | added | mutated)))


if __name__ == "__main__":
    main()
