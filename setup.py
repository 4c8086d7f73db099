"""Build hook: install ``peft_perft-autoload.pth`` at the top of site-packages (everything else is pyproject.toml).

Python runs that file's line at start-up; it calls ``peft_perft_autoload.install()``, so that PERFT is registered with
peft whenever peft is imported (see peft_perft_autoload.py). setuptools has no declarative way to put a file at the
top of site-packages, hence this one subclass of ``build_py``: it writes the file into the wheel's root for a regular
install, and into the editable wheel's root for ``pip install -e .``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "peft_perft-autoload.pth"
PTH_LINE = "import peft_perft_autoload; peft_perft_autoload.install()\n"


class build_py_with_pth(build_py):  # noqa: N801 - setuptools command naming
    """``build_py`` that also writes the autoload .pth file."""

    def run(self) -> None:
        super().run()
        for directory in self._pth_directories():
            Path(directory).mkdir(parents=True, exist_ok=True)
            Path(directory, PTH_NAME).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]

    def _pth_directories(self) -> list[str]:
        """build_lib for a wheel; an editable wheel copies only its unpacked root, which install_lib points at."""
        if not self.editable_mode:
            return [self.build_lib]
        return [self.build_lib, self.get_finalized_command("install").install_lib]


setup(cmdclass={"build_py": build_py_with_pth})
