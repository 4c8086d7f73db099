"""The documented torch install commands install what their labels say: the CPU build without CUDA libraries.

PyPI's default torch is the CUDA build, which pulls in about twenty ``nvidia-*``/``cuda-*`` packages; only PyTorch's
CPU index serves the CPU build. Every ``pip install torch`` line of the README and the docs either names that index
or is labelled, in the comment above it, as the command for a machine with an NVIDIA GPU. Where the network allows,
``pip install --dry-run --report`` resolves each kind against the public index (``--isolated``: no local pip
configuration or wheel folder may answer instead) and the report is checked; where an index cannot be reached the
test skips and says which.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh)\n(?P<body>.*?)^```", re.M | re.S)
TORCH_INSTALL = re.compile(r"^(?:# )?(?P<command>pip install torch\S*(?: [^#\n]*)?)")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
GPU_LABEL = re.compile(r"\bwith an NVIDIA GPU")
UNREACHABLE = (
    "NameResolutionError",
    "Failed to resolve",
    "Failed to establish a new connection",
    "Network is unreachable",
)
CUDA_PACKAGE = re.compile(r"^(nvidia-|cuda-)", re.I)


def torch_installs() -> list[tuple[str, str, str]]:
    """(page, command, the comment line above it) for every documented ``pip install torch`` line."""
    found = []
    for page in PAGES:
        for block in FENCE.finditer(page.read_text()):
            lines = block["body"].splitlines()
            for index, line in enumerate(lines):
                match = TORCH_INSTALL.match(line)
                if match:
                    above = lines[index - 1] if index and lines[index - 1].startswith("#") else ""
                    found.append((page.name, match["command"].strip(), above))
    return found


def cpu_command() -> str:
    return next(command for _, command, _ in torch_installs() if CPU_INDEX in command)


def gpu_command() -> str:
    return next(
        command for _, command, above in torch_installs() if CPU_INDEX not in command and GPU_LABEL.search(above)
    )


def test_every_torch_install_names_the_cpu_index_or_is_labelled_for_an_nvidia_gpu() -> None:
    installs = torch_installs()
    assert {page for page, _, _ in installs} >= {"README.md", "getting_started.md"}
    for page, command, above in installs:
        if CPU_INDEX not in command:
            assert GPU_LABEL.search(above), f"{page}: `{command}` installs PyPI's CUDA build without saying so"
        else:
            assert shlex.split(command)[shlex.split(command).index("--index-url") + 1] == CPU_INDEX


def dry_run(command: str, tmp_path: Path) -> list[str]:
    """The names and versions pip would install for ``command`` on an empty environment, from the public index."""
    report = tmp_path / "report.json"
    arguments = shlex.split(command)[2:]  # after "pip install"
    if "--index-url" not in arguments:
        arguments += ["--index-url", "https://pypi.org/simple"]
    index = arguments[arguments.index("--index-url") + 1]
    _skip_without_network_to(index)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--timeout", "30", "--report", str(report), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [
        f"{item['metadata']['name']} {item['metadata']['version']}"
        for item in json.loads(report.read_text())["install"]
    ]


def test_the_cpu_command_installs_no_cuda_package(tmp_path: Path) -> None:
    installed = dry_run(cpu_command(), tmp_path)
    assert any(name.startswith("torch ") and name.endswith("+cpu") for name in installed), installed
    assert not [name for name in installed if CUDA_PACKAGE.match(name)]


def test_the_gpu_command_is_the_cuda_build(tmp_path: Path) -> None:
    """The label is right too: from PyPI, the same torch brings the CUDA libraries."""
    installed = dry_run(gpu_command(), tmp_path)
    assert [name for name in installed if CUDA_PACKAGE.match(name)], installed


def _skip_without_network_to(index: str) -> None:
    host = urlparse(index).hostname
    try:
        socket.create_connection((host, 443), timeout=10).close()
    except OSError as error:
        pytest.skip(f"no network to the index {index}: {error}")
