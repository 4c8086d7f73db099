"""Clients that never import peft_perft load PERFT adapters: lm-evaluation-harness, Transformers, peft's Auto classes.

Each client runs in a fresh interpreter that first probes for peft with ``importlib.util.find_spec`` (as
Transformers' ``is_peft_available()`` and lm-eval do) and never mentions peft_perft; the installed start-up hook
(``peft_perft-autoload.pth``) must register PERFT. What the client computes is compared with this process's own
``PeftModel.from_pretrained`` forward, and with the base model's, which it must differ from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, char_tokenizer
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_perft import PerftConfig

VARIANTS = {"R": {"num_experts": 4, "top_k": 2}, "E": {}}
CHARACTERS = string.ascii_letters + string.digits + " .,?!:'-"
TIMEOUT_SECONDS = 400

PROBE_FIRST = """
import importlib.util, json, sys
assert importlib.util.find_spec("peft") is not None
assert "peft" not in sys.modules and "peft_perft" not in sys.modules, "probing must import nothing"
import torch
from transformers import AutoModelForCausalLM, pipeline
base_dir, output_path, tokens_path, *adapter_dirs = sys.argv[1:]
tokens = torch.load(tokens_path)
"""

LOGITS_CLIENTS = {
    "transformers_from_pretrained_adapter_dir": "model = AutoModelForCausalLM.from_pretrained(adapter_dir)",
    "transformers_load_adapter": (
        "model = AutoModelForCausalLM.from_pretrained(base_dir)\n    model.load_adapter(adapter_dir)"
    ),
    "transformers_pipeline": (
        "generator = pipeline('text-generation', model=adapter_dir, device='cpu')\n"
        "    assert isinstance(generator('abc', max_new_tokens=2, do_sample=False)[0]['generated_text'], str)\n"
        "    model = generator.model"
    ),
    "peft_auto_peft_model": (
        "from peft import AutoPeftModelForCausalLM\n    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)"
    ),
}

PEFT_CONFIG_CLIENT = """
from peft import PeftConfig
configs = [PeftConfig.from_pretrained(adapter_dir) for adapter_dir in adapter_dirs]
summary = [[type(config).__name__, config.peft_type.value, config.variant] for config in configs]
open(output_path, "w").write(json.dumps(summary))
"""

LM_EVAL_CLIENT = """
import importlib.util, sys
assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
from lm_eval.__main__ import cli_evaluate  # what the lm_eval console script runs

sys.argv = ["lm_eval", *sys.argv[1:]]
sys.exit(cli_evaluate())
"""

LM_EVAL_DOCUMENTS = [
    {"context": "The cat sat on the", "continuation": " mat."},
    {"context": "One, two,", "continuation": " three!"},
    {"context": "Is it 42?", "continuation": " Yes, it is."},
]
LM_EVAL_TASK = """task: perft_tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def _logits_client_script(client: str) -> str:
    body = LOGITS_CLIENTS[client]
    return (
        f"{PROBE_FIRST}logits = []\nfor adapter_dir in adapter_dirs:\n    {body}\n"
        "    with torch.no_grad():\n        logits.append(model.eval()(input_ids=tokens).logits)\n"
        "torch.save(logits, output_path)\n"
    )


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter, offline, with the start-up hook on (whatever this process's environment says)."""
    env = {key: value for key, value in os.environ.items() if key != "PEFT_PERFT_AUTOLOAD"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny OLMoE with a character tokenizer on disk, PERFT-R and PERFT-E adapters with random B, a token batch."""
    root = tmp_path_factory.mktemp("clients")
    tokenizer = char_tokenizer(CHARACTERS)
    base_dir = root / "base"
    build_tiny("olmoe", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapters = {}
    for variant, sizes in VARIANTS.items():
        config = PerftConfig(variant=variant, r=4, init_weights=False, **sizes)
        adapters[variant] = root / f"adapter-{variant}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(adapters[variant])
    tokens = torch.randint(3, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, root / "tokens.pt")
    return {"root": root, "base": base_dir, "adapters": adapters, "tokens": tokens}


def _reference(base_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """The base model, or peft's own loading of the adapter on it, in this process."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return (model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir)).eval()


@pytest.mark.parametrize("client", LOGITS_CLIENTS)
def test_client_loads_perft_adapters_with_peft_logits(client: str, saved: dict, tmp_path: Path) -> None:
    script, output = tmp_path / f"client_{client}.py", tmp_path / "logits.pt"
    script.write_text(_logits_client_script(client))
    adapter_dirs = [str(saved["adapters"][variant]) for variant in VARIANTS]
    _run(
        [sys.executable, str(script), str(saved["base"]), str(output), str(saved["root"] / "tokens.pt"), *adapter_dirs],
        tmp_path,
    )
    with torch.no_grad():
        base_logits = _reference(saved["base"], None)(input_ids=saved["tokens"]).logits
        for variant, logits in zip(VARIANTS, torch.load(output), strict=True):
            expected = _reference(saved["base"], saved["adapters"][variant])(input_ids=saved["tokens"]).logits
            torch.testing.assert_close(logits, expected, msg=f"{client}, PERFT-{variant}")
            assert (logits - base_logits).abs().max() > 1e-3, f"{client} ignored the PERFT-{variant} adapter"


def test_peft_config_from_pretrained_reads_perft_configs(saved: dict, tmp_path: Path) -> None:
    script, output = tmp_path / "client_peft_config.py", tmp_path / "configs.json"
    script.write_text(PROBE_FIRST + PEFT_CONFIG_CLIENT)
    adapter_dirs = [str(saved["adapters"][variant]) for variant in VARIANTS]
    _run(
        [sys.executable, str(script), str(saved["base"]), str(output), str(saved["root"] / "tokens.pt"), *adapter_dirs],
        tmp_path,
    )
    assert json.loads(output.read_text()) == [["PerftConfig", "PERFT", variant] for variant in VARIANTS]


def _continuation_log_likelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), from one forward over context + continuation."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([whole_ids])).logits[0].double(), dim=-1)
    return sum(
        log_probs[position - 1, whole_ids[position]].item() for position in range(len(context_ids), len(whole_ids))
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_evaluation_harness_scores_perft_adapters_like_our_forward(
    variant: str, saved: dict, tmp_path: Path
) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-evaluation-harness is not installed (it is in the 'test' extra: pip install -e '.[test]')")
    data_file, task_dir, output_dir = tmp_path / "documents.json", tmp_path / "tasks", tmp_path / "results"
    data_file.write_text(json.dumps(LM_EVAL_DOCUMENTS))
    task_dir.mkdir()
    (task_dir / "perft_tiny_loglikelihood.yaml").write_text(LM_EVAL_TASK.format(data_file=data_file))
    model_args = f"pretrained={saved['base']},peft={saved['adapters'][variant]},dtype=float32"
    arguments = ["--model", "hf", "--model_args", model_args, "--tasks", "perft_tiny_loglikelihood"]
    arguments += ["--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--log_samples"]
    _run([sys.executable, "-c", LM_EVAL_CLIENT, *arguments, "--output_path", str(output_dir)], tmp_path)

    (samples_file,) = output_dir.rglob("samples_perft_tiny_loglikelihood_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    tokenizer = AutoTokenizer.from_pretrained(saved["base"])
    adapted, base = _reference(saved["base"], saved["adapters"][variant]), _reference(saved["base"], None)
    assert len(samples) == len(LM_EVAL_DOCUMENTS)
    for sample, document in zip(samples, LM_EVAL_DOCUMENTS, strict=True):
        arguments = sample["arguments"]["gen_args_0"]
        assert (arguments["arg_0"], arguments["arg_1"]) == (document["context"], document["continuation"])
        harness = float(sample["resps"][0][0][0])
        ours = _continuation_log_likelihood(adapted, tokenizer, document["context"], document["continuation"])
        without_adapter = _continuation_log_likelihood(base, tokenizer, document["context"], document["continuation"])
        assert harness == pytest.approx(ours, abs=1e-4), f"document {sample['doc_id']}"
        assert abs(harness - without_adapter) > 1e-2, f"lm-eval scored the base model, not PERFT-{variant}"
