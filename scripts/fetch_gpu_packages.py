"""Fetch, on a machine with internet, the packages that `scripts/gpu_session.sh` installs on a GPU machine without it.

The GPU machines lent to this project (one H200, Python 3.12, CUDA torch 2.11) have no network and an image that
holds PyTorch, accelerate, pytest and hypothesis but not necessarily the versions of Transformers and peft this
package pins, nor MegaBlocks. This script puts into ``.whl/`` (ignored by git):

- Python 3.12 wheels of the pinned Transformers and peft and of the compiled pieces Transformers needs in new
  enough versions (tokenizers, safetensors, regex), downloaded by pip without dependencies;
- the source distributions of MegaBlocks 0.10.0 and of the two packages it builds on (stanford-stk, grouped_gemm),
  which must be compiled against the GPU machine's own torch and CUDA (their releases pin torch 2.7.0, so pip
  cannot install them as dependencies; see the MegaBlocks section of docs/performance.md).

    python scripts/fetch_gpu_packages.py            # then: device run with carry [".whl"] and scripts/gpu_session.sh
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

WHEELS = ["transformers==5.24.0", "peft==0.21.2", "tokenizers==0.23.3", "safetensors==0.8.0", "regex==2026.11.19"]
SOURCES = {"megablocks": "0.10.0", "stanford-stk": "0.7.1", "grouped_gemm": "0.3.0"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def download_wheels(folder: Path) -> None:
    """Python 3.12 x86-64 wheels of ``WHEELS``, without dependencies (the GPU image has the rest)."""
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    subprocess.run([*command, "--implementation", "cp", *platforms, "--dest", str(folder), *WHEELS], check=True)


def download_source(name: str, version: str, folder: Path) -> Path:
    """The sdist of ``name`` ``version`` from PyPI's JSON API (pip would try to build it to read its metadata)."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as response:
        files = json.load(response)["releases"].get(version, [])
    sdists = [file for file in files if file["packagetype"] == "sdist"]
    if not sdists:
        raise SystemExit(f"PyPI lists no source distribution of {name} {version}; check SOURCES in {__file__}.")
    target = folder / sdists[0]["filename"]
    urllib.request.urlretrieve(sdists[0]["url"], target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    args.dest.mkdir(exist_ok=True)
    download_wheels(args.dest)
    for name, version in SOURCES.items():
        print(f"Saved {download_source(name, version, args.dest)}")
    total = sum(path.stat().st_size for path in args.dest.iterdir()) / 2**20
    print(f"{args.dest}: {total:.1f} MiB (a device run carries at most 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
