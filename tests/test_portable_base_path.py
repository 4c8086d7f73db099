"""An adapter of the bundled demo model names it portably in adapter_config.json and reloads from anywhere.

The folder is saved, copied to another place and loaded in a fresh process started elsewhere, the way users load
adapters (`AutoPeftModelForCausalLM`, `PeftModel.from_pretrained`); the logits must equal the saving model's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_perft import PerftConfig
from peft_perft.config import BUNDLED_MODEL_ID
from peft_perft.demo import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
INPUT_IDS = [[5, 9, 14, 20, 33, 41, 60]]

RELOAD = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM

adapter, input_ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
config = PeftConfig.from_pretrained(adapter)
auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path), adapter).eval()
with torch.no_grad():
    logits = [model(input_ids=input_ids).logits.tolist() for model in (auto, plain)]
print(json.dumps({"base": config.base_model_name_or_path, "logits": logits}))
"""


def test_adapter_of_the_bundled_model_reloads_from_another_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR), PerftConfig(variant="R", r=4))
    with torch.no_grad():  # adapter B starts at zero: move it so the adapter changes the logits
        for name, parameter in model.named_parameters():
            if "perft_B" in name:
                parameter.normal_(std=0.05)
    model.eval()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)

    stored = json.loads((saved / "adapter_config.json").read_text())
    assert stored["base_model_name_or_path"] == BUNDLED_MODEL_ID
    assert str(Path(BUNDLED_MODEL_DIR).parent) not in (saved / "adapter_config.json").read_text()
    assert model.peft_config["default"].base_model_name_or_path == BUNDLED_MODEL_DIR  # the live model is untouched

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(saved, elsewhere / "copied-adapter")
    shutil.rmtree(saved)
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, "copied-adapter", json.dumps(INPUT_IDS)],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(reloaded["base"]) == Path(BUNDLED_MODEL_DIR)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(INPUT_IDS)).logits
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=torch.tensor(INPUT_IDS)).logits
    assert not torch.equal(expected, base_logits)
    for logits in reloaded["logits"]:
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=0, atol=1e-6)
