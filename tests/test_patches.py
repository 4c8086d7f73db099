"""`peft_perft.patches` is the whole list of what ``import peft_perft`` changes in its dependencies, and the changes
reach PERFT adapters only: a LoRA adapter saved with peft_perft imported is byte for byte what peft alone writes.

Each check runs fresh interpreters with the autoload hook off (``PEFT_PERFT_AUTOLOAD=0``), so that peft is seen
before and without peft_perft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft

from peft_perft import patches

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 600


def _python(*arguments: str, cwd: Path | None = None) -> str:
    # A fixed hash seed: peft writes LoraConfig.target_modules, a set, in the set's iteration order.
    environment = {**os.environ, "PEFT_PERFT_AUTOLOAD": "0", "PYTHONPATH": str(TESTS.parent), "PYTHONHASHSEED": "0"}
    result = subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, timeout=TIMEOUT_S, env=environment, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _is_under(change: str, target: str) -> bool:
    return change == target or change.startswith(f"{target}.")


def test_importing_the_package_changes_only_what_the_patches_module_lists() -> None:
    """Every attribute of peft, Transformers, TRL, Accelerate, torch... that the import rebinds, adds or fills is
    under a declared target, and every declared target in those packages is changed (the list is not stale)."""
    loaded = _python("-c", "import sys, peft_perft, json; print(json.dumps(sorted(sys.modules)))")
    dependencies = [name for name in json.loads(loaded) if not name.startswith("peft_perft")]
    changes = json.loads(_python(str(TESTS / "patch_probe.py"), json.dumps(dependencies)))
    targets = [target for patch in patches.PATCHES for target in patch.targets]
    assert changes, "the probe saw no change at all, so it cannot be trusted"
    assert [change for change in changes if not any(_is_under(change, t) for t in targets)] == []
    outside = [target for target in targets if not target.startswith("peft_perft")]
    assert [target for target in outside if not any(_is_under(change, target) for change in changes)] == []


LORA_SAVE = """
import sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import OlmoeConfig, OlmoeForCausalLM

if sys.argv[2] == "with-peft-perft":
    import peft_perft  # noqa: F401
assert ("peft_perft" in sys.modules) == (sys.argv[2] == "with-peft-perft")
torch.manual_seed(0)
config = OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0)
lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
get_peft_model(OlmoeForCausalLM(config), lora).save_pretrained(sys.argv[1])
"""


def test_a_lora_adapter_is_saved_byte_for_byte_as_peft_alone_writes_it(tmp_path: Path) -> None:
    folders = {}
    for mode in ("peft-alone", "with-peft-perft"):
        folders[mode] = tmp_path / mode
        _python("-c", LORA_SAVE, str(folders[mode]), mode, cwd=tmp_path)
    files = {mode: sorted(path.name for path in folder.iterdir()) for mode, folder in folders.items()}
    assert files["peft-alone"] == files["with-peft-perft"] and "adapter_model.safetensors" in files["peft-alone"]
    for name in files["peft-alone"]:
        alone, with_perft = ((folders[mode] / name).read_bytes() for mode in folders)
        assert alone == with_perft, f"{name} differs when peft_perft is imported"


def test_installing_twice_wraps_nothing_twice() -> None:
    """A second `install` (a reload, the autoload hook and an explicit import) keeps the wrappers in place."""
    before = peft.PeftModel.save_pretrained
    patches.install()
    assert peft.PeftModel.save_pretrained is before and getattr(before, patches.INSTALLED)
    assert not getattr(before.__wrapped__, patches.INSTALLED, False)


def test_a_lora_save_does_not_take_the_perft_atomic_path(tmp_path: Path, monkeypatch) -> None:
    """The save wrapper hands a state dict without PERFT tensors straight to safetensors."""
    from conftest import build_tiny
    from peft import LoraConfig, get_peft_model

    from peft_perft import loading

    def refuse(*_arguments: object) -> None:
        raise AssertionError("a LoRA save went through PERFT's atomic save")

    monkeypatch.setattr(loading, "_write_tensors", refuse)
    get_peft_model(build_tiny(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size > 0
