"""Installed peft-perft registers PERFT when peft is imported: plain peft code loads PERFT adapters in a fresh process.

Each check runs a new interpreter that never imports peft_perft; the installed ``peft_perft-autoload.pth`` must do it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_perft import PerftConfig

PTH_NAME = "peft_perft-autoload.pth"

LOAD_WITHOUT_IMPORT = """
import json, sys
started_with = sorted(name for name in ("peft", "peft_perft", "torch", "transformers") if name in sys.modules)
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, inputs_path = sys.argv[1:4]
config = PeftConfig.from_pretrained(adapter_dir)
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
tokens = torch.load(inputs_path)
with torch.no_grad():
    logits = [model(input_ids=tokens).logits for model in (plain, auto)]
torch.save(logits, inputs_path + ".out")
print(json.dumps({"started_with": started_with, "config": type(config).__name__, "peft_type": config.peft_type.value}))
"""


def _installed_pth() -> Path:
    """The autoload file in this interpreter's site-packages; skip (visibly) when peft-perft is not pip-installed."""
    try:
        importlib.metadata.distribution("peft-perft")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("peft-perft is not pip-installed in this environment (pip install -e . installs the hook)")
    path = Path(sysconfig.get_paths()["purelib"], PTH_NAME)
    assert path.is_file(), f"{path} is missing: reinstall with `pip install -e .` to get the start-up hook"
    return path


def _run(script: str, *args: str, autoload: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PEFT_PERFT_AUTOLOAD"} | {"HF_HUB_OFFLINE": "1"}
    if autoload is not None:
        env["PEFT_PERFT_AUTOLOAD"] = autoload
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=240, env=env, cwd=os.sep
    )


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.Tensor]:
    """A tiny OLMoE on disk, a PERFT-R adapter with random B for it, a token batch, and this process's logits."""
    root = tmp_path_factory.mktemp("autoload")
    base_dir, adapter_dir, inputs_path = root / "base", root / "adapter", root / "tokens.pt"
    build_tiny("olmoe").save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        PerftConfig(variant="R", r=4, num_experts=4, top_k=2, init_weights=False),
    ).eval()
    model.save_pretrained(adapter_dir)
    tokens = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, inputs_path)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    return base_dir, adapter_dir, inputs_path, expected


def test_plain_peft_loads_perft_adapter_without_import(saved_adapter) -> None:
    _installed_pth()
    base_dir, adapter_dir, inputs_path, expected = saved_adapter
    result = _run(LOAD_WITHOUT_IMPORT, str(base_dir), str(adapter_dir), str(inputs_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["started_with"] == [], "the start-up hook must import nothing heavy before the user imports peft"
    assert summary["config"] == "PerftConfig" and summary["peft_type"] == "PERFT"
    for logits in torch.load(str(inputs_path) + ".out"):
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def test_autoload_can_be_turned_off(saved_adapter) -> None:
    _installed_pth()
    _, adapter_dir, _, _ = saved_adapter
    script = (
        "import sys; import peft; assert 'peft_perft' not in sys.modules; peft.PeftConfig.from_pretrained(sys.argv[1])"
    )
    result = _run(script, str(adapter_dir), autoload="0")
    assert result.returncode != 0
    assert "PERFT" in result.stderr  # peft's own failure on the unknown peft_type
