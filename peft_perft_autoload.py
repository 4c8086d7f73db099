"""Register PERFT with peft the moment peft is imported, so that plain peft code loads PERFT adapters.

Installing peft-perft puts ``peft_perft-autoload.pth`` into site-packages; Python runs its one line at start-up,
which calls `install`. That only adds a finder to ``sys.meta_path`` (this module imports nothing but the standard
library). When ``peft`` is imported, by any route (``import peft``, ``importlib.import_module``, a submodule import,
``pkgutil.resolve_name``), peft's own code runs unchanged and, once peft is complete, ``peft_perft`` is imported,
which registers ``PeftType.PERFT``: ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``PeftConfig.from_pretrained`` and Transformers' adapter loading handle PERFT adapters in programs that never
``import peft_perft`` (serving scripts, lm-evaluation-harness's ``peft=``). A program that never imports peft
pays nothing.

The finder stays on ``sys.meta_path`` until peft has actually been executed: probing for peft without importing it
(``importlib.util.find_spec("peft")``, which Transformers' ``is_peft_available()`` and many tools call) must not use
it up. Child processes (``subprocess``, spawned DataLoader workers, ``torchrun``) run the same .pth at their start-up.

Set ``PEFT_PERFT_AUTOLOAD=0`` to turn it off; ``import peft_perft`` then registers PERFT as before.

This is a top-level module, not part of the ``peft_perft`` package, because importing anything inside that package
imports peft, torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import threading
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
    at every start-up. It answers every lookup of ``peft`` until peft has been executed (a lookup alone imports
    nothing), then takes itself off ``sys.meta_path``.
    """

    def __init__(self) -> None:
        self._looking_up = threading.local()

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None):
        if fullname != TARGET_MODULE or getattr(self._looking_up, "active", False):
            return None  # not peft, or a finder below asked the import system again while we ask it: no loop
        self._looking_up.active = True
        try:
            spec = self._find_with_the_other_finders(fullname, path, target)
        finally:
            self._looking_up.active = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def peft_executed(self) -> None:
        """peft is complete: register PERFT, and stop looking at imports (peft is in ``sys.modules`` from now on)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register()

    def _find_with_the_other_finders(self, fullname: str, path: object, target: ModuleType | None):
        """The spec the import system would find without this hook (site-packages, an editable install's finder...)."""
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                return spec
        return None


class _RegisteringLoader:
    """Runs peft's own loader, puts it back on the module, then registers PERFT.

    Anything else asked of it (``is_package``, ``get_filename``, ``get_resource_reader``...) is peft's own loader's
    answer, so tools that inspect a probed spec see what they would without the hook.
    """

    def __init__(self, loader: importlib.machinery.SourceFileLoader, hook: PeftImportHook) -> None:
        self.loader = loader
        self.hook = hook

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # copy/pickle probe dunders before __init__ ran: never loop through self.loader
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook.peft_executed()


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
