"""Register PERFT with peft the moment peft is imported, so that plain peft code loads PERFT adapters.

Installing peft-perft puts ``peft_perft-autoload.pth`` into site-packages; Python runs its one line at start-up,
which calls `install`. That only adds a finder to ``sys.meta_path`` (this module imports nothing but the standard
library). The first ``import peft`` anywhere then runs peft's own code unchanged and, once peft is complete, imports
``peft_perft``, which registers ``PeftType.PERFT``: ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and
``PeftConfig.from_pretrained`` handle PERFT adapters in programs that never ``import peft_perft`` (serving scripts,
lm-evaluation-harness's ``peft=``). A program that never imports peft pays nothing.

Set ``PEFT_PERFT_AUTOLOAD=0`` to turn it off; ``import peft_perft`` then registers PERFT as before.

This is a top-level module, not part of the ``peft_perft`` package, because importing anything inside that package
imports peft, torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from types import ModuleType

AUTOLOAD_ENV = "PEFT_PERFT_AUTOLOAD"
TARGET_MODULE = "peft"
REGISTERING_MODULE = "peft_perft"


def enabled() -> bool:
    """False when the user turned the registration off with ``PEFT_PERFT_AUTOLOAD=0`` (or false/no/off)."""
    return os.environ.get(AUTOLOAD_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def install() -> None:
    """Arrange for ``peft_perft`` to be imported right after ``peft`` (now, if peft is already imported)."""
    if not enabled():
        return
    if TARGET_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, PeftImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())


class PeftImportHook:
    """Finds ``peft`` the usual way and hands back its spec with a loader that registers PERFT afterwards.

    A meta path finder by protocol; it does not subclass ``importlib.abc``, whose import costs tens of milliseconds
    at every start-up.
    """

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None):
        if fullname != TARGET_MODULE:
            return None
        sys.meta_path.remove(self)  # one-shot: later imports never see this finder
        spec = _find_with_the_other_finders(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _find_with_the_other_finders(fullname: str, path: object, target: ModuleType | None):
    """The spec the import system would find without this hook (site-packages, an editable install's finder...)."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(fullname, path, target) if find_spec is not None else None
        if spec is not None:
            return spec
    return None


class _RegisteringLoader:
    """Runs peft's own loader, puts it back on the module, then registers PERFT."""

    def __init__(self, loader: importlib.machinery.SourceFileLoader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


def _register() -> None:
    """Import ``peft_perft`` (which registers PERFT); a failure warns instead of breaking ``import peft``."""
    try:
        importlib.import_module(REGISTERING_MODULE)
    except Exception as error:  # noqa: BLE001 - peft must stay importable whatever goes wrong on our side
        import warnings

        warnings.warn(
            f"peft-perft could not register PERFT with peft ({type(error).__name__}: {error}); PERFT adapters will "
            f"not load until `import peft_perft` succeeds. Set {AUTOLOAD_ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
