"""Installed peft-perft registers PERFT when peft is imported: plain peft code loads PERFT adapters in a fresh process.

Each check runs a new interpreter that never imports peft_perft; the installed ``peft_perft-autoload.pth`` must do it.
Every import route first probes for peft with ``importlib.util.find_spec`` (as Transformers' ``is_peft_available()``
does), which once used up the hook so that the real import registered nothing.
"""

from __future__ import annotations

import importlib.machinery
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

import peft_perft_autoload
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


# Every route script starts like a tool that probes for peft before (maybe) importing it.
PROBE_FIRST = """
import importlib.util, json, sys
assert importlib.util.find_spec("peft") is not None
assert "peft" not in sys.modules, "probing for peft must not import it"


def registered():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return "PERFT" in PEFT_TYPE_TO_CONFIG_MAPPING
"""

IMPORT_ROUTES = {
    "import_statement": "import peft.peft_model as pm\nprint(json.dumps('PERFT' in pm.PEFT_TYPE_TO_CONFIG_MAPPING))",
    "transformers_is_peft_available": (
        "from transformers.utils import is_peft_available\n"
        "assert is_peft_available() and 'peft' not in sys.modules\n"
        "import peft\n"
        "print(json.dumps(registered()))"
    ),
    "importlib_import_module": (
        "mapping = importlib.import_module('peft.mapping')\n"
        "print(json.dumps('PERFT' in mapping.PEFT_TYPE_TO_CONFIG_MAPPING))"
    ),
    "pkgutil_walk": (
        "import pkgutil\n"
        "assert any(module.name == 'peft' for module in pkgutil.iter_modules())\n"
        "mapping = pkgutil.resolve_name('peft.mapping:PEFT_TYPE_TO_CONFIG_MAPPING')\n"
        "print(json.dumps('PERFT' in mapping))"
    ),
    "subprocess": (
        "import subprocess\n"
        "if sys.argv[1:] == ['child']:\n"
        "    print(json.dumps(registered()))\n"
        "else:\n"
        "    child = subprocess.run([sys.executable, __file__, 'child'], capture_output=True, text=True, timeout=200)\n"
        "    assert child.returncode == 0, child.stderr\n"
        "    print(child.stdout.strip().splitlines()[-1])"
    ),
    "spawned_dataloader_worker": (
        "import torch.utils.data\n"
        "class Probe(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 1\n"
        "    def __getitem__(self, index):\n"
        "        imported_before = 'peft' in sys.modules\n"
        "        return {'imported_before': imported_before, 'registered': registered()}\n"
        "if __name__ == '__main__':\n"
        "    loader = torch.utils.data.DataLoader(\n"
        "        Probe(), batch_size=None, num_workers=1, multiprocessing_context='spawn'\n"
        "    )\n"
        "    item = next(iter(loader))\n"
        "    assert not item['imported_before'] and 'peft' not in sys.modules, 'the worker must import peft itself'\n"
        "    print(json.dumps(item['registered']))"
    ),
    "torchrun_child": "if __name__ == '__main__':\n    print(json.dumps(registered()))",
}


def _environment(autoload: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PEFT_PERFT_AUTOLOAD"} | {"HF_HUB_OFFLINE": "1"}
    if autoload is not None:
        env["PEFT_PERFT_AUTOLOAD"] = autoload
    return env


def _run(script: str, *args: str, autoload: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=_environment(autoload),
        cwd=os.sep,
    )


def _run_route(route: str, folder: Path, autoload: str | None = None) -> bool:
    """Whether peft had PERFT registered when the route's fresh process (or its child) imported it."""
    script = folder / f"route_{route}.py"  # not the bare route name: "subprocess.py" would shadow the module
    script.write_text(PROBE_FIRST + IMPORT_ROUTES[route] + "\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    command = [*(launcher if route == "torchrun_child" else [sys.executable]), str(script)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=400, env=_environment(autoload), cwd=folder
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


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


@pytest.mark.parametrize("route", IMPORT_ROUTES)
def test_every_import_route_registers_perft_after_probing(route: str, tmp_path: Path) -> None:
    _installed_pth()
    assert _run_route(route, tmp_path) is True


@pytest.mark.parametrize("route", ["import_statement", "spawned_dataloader_worker"])
def test_every_import_route_honours_the_off_switch(route: str, tmp_path: Path) -> None:
    _installed_pth()
    assert _run_route(route, tmp_path, autoload="0") is False


def test_probing_leaves_the_hook_installed_and_nested_hooks_do_not_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup returns peft's real spec (wrapped) and keeps the finder; two such finders ask each other only once."""
    outer, inner = peft_perft_autoload.PeftImportHook(), peft_perft_autoload.PeftImportHook()
    monkeypatch.setattr(sys, "meta_path", [outer, inner, *sys.meta_path])
    spec = outer.find_spec("peft")
    assert spec is not None and spec.origin == importlib.util.find_spec("peft").origin
    loader = spec.loader
    while isinstance(loader, peft_perft_autoload._RegisteringLoader):
        loader = loader.loader
    assert isinstance(loader, importlib.machinery.SourceFileLoader)
    assert spec.loader.is_package("peft")  # what peft's own loader answers
    assert sys.meta_path[:2] == [outer, inner], "a lookup alone must not take the finder off"
    assert outer.find_spec("torch") is None
