"""Every causal-LM MoE architecture of the installed Transformers whose config has a tensor-parallel plan, split over
``DistributedConfig(tp_size=2)`` and over ``DistributedConfig(tp_size=2, ep_size=2, ep_implementation="perft")`` (two
CPU processes over gloo) with a PERFT adapter, against one process; writes docs/tensor_parallel_matrix.md (a page of
the documentation site).

Per architecture, the tiny model of ``tests/test_architectures.py`` (the support matrix's) is saved with one adapter
per variant (random ``B``, so that it changes the output). One process computes the reference: the logits, and the
adapter's gradients after one training forward and backward. The two processes load the base split as each layout
says, load each adapter (``PeftModel.from_pretrained``), and compare both. The base alone is checked the same way (its
logits, and a backward with only the input embeddings trainable), so that a failure of Transformers' own path shows
as such rather than as PERFT's. Every training forward starts from the same seed, so that blocks that route at
random in training (PhiMoE's sparsemixer) draw the same routing in every run.

    python scripts/tensor_parallel_matrix.py            # every architecture, both layouts, R E S; 16 min on 2 cores
    python scripts/tensor_parallel_matrix.py --types olmoe beam --layouts tp --variants S --output /tmp/tp.md
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
import torch.distributed as dist
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import peft_perft  # noqa: F401  (registers PERFT with peft)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import test_architectures  # noqa: E402  (the support matrix's tiny models)

DEFAULT_OUTPUT = REPO / "docs" / "tensor_parallel_matrix.md"
LAYOUTS = {
    "tp": {"tp_size": 2},
    "tp_ep": {"tp_size": 2, "ep_size": 2, "ep_implementation": "perft"},
}
"""The ``DistributedConfig`` of each layout checked."""
TRAINING_SEED = 11
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
LAUNCH_TIMEOUT_S = 900
CASE_TIMEOUT_S = 60
"""Per case (one load and two passes of a tiny model): a launch still running after this long per case is a hang;
every rank's stack is printed and the launch exits."""


def tensor_parallel_types() -> list[str]:
    """The covered causal-LM MoE types whose (text) config declares a tensor-parallel plan."""
    found = []
    for model_type in test_architectures.COVERED:
        config = test_architectures.tiny_config(model_type)
        text_config = getattr(config, "text_config", None) or config
        if getattr(text_config, "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None):
            found.append(model_type)
    return found


def training_pass(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    model.train()
    torch.manual_seed(TRAINING_SEED)
    model(input_ids=input_ids, labels=input_ids).loss.backward()


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def trainable_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each trainable tensor's gradient, whole (a TP-split adapter tensor's is gathered)."""
    gradients = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.grad is not None:
            grad = parameter.grad
            gradients[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return gradients


def prepare(folder: Path, model_type: str, variants: list[str]) -> str | None:
    """Save the tiny base, one adapter per variant and the one-process references; an error message if that fails
    (the model is then left out of the launch). A variant ``get_peft_model`` refuses is recorded as refused."""
    input_ids = test_architectures._input_ids()
    try:
        base = test_architectures.tiny_model(model_type)
        base.save_pretrained(folder / "base")
        reference = {"base_logits": logits_of(base, input_ids)}
        for variant in variants:
            torch.manual_seed(0)
            config = test_architectures._perft_config(variant)
            try:
                model = get_peft_model(test_architectures.tiny_model(model_type), config)
            except ValueError as refusal:  # PERFT-E on a block that cannot take it: refused by design
                reference[variant] = f"refused by get_peft_model: {str(refusal)[:80]}"
                continue
            model.save_pretrained(folder / variant)
            reference[variant] = {"logits": logits_of(model, input_ids)}
            training_pass(model, input_ids)
            reference[variant]["gradients"] = trainable_gradients(model)
    except Exception as error:  # the table reports it, whatever it is
        return f"{type(error).__name__}: {error}"
    torch.save(reference, folder / "reference.pt")
    return None


def check_base(folder: Path, layout: str, reference: dict, input_ids: torch.Tensor) -> str:
    """Transformers' own TP path on this model, without PERFT: 'ok' or what failed."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder / "base", distributed_config=DistributedConfig(**LAYOUTS[layout])
        )
        if not torch.allclose(logits_of(model, input_ids), reference["base_logits"], **TOLERANCE):
            return "logits differ"
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        training_pass(model, input_ids)
    except Exception as error:
        return f"fails: {type(error).__name__}: {str(error)[:120]}"
    return "ok"


def check_variant(folder: Path, layout: str, variant: str, reference: dict, input_ids: torch.Tensor) -> str:
    """One adapter on the base split as ``layout`` says against one process: 'ok' or what differed or failed."""
    try:
        base = AutoModelForCausalLM.from_pretrained(
            folder / "base", distributed_config=DistributedConfig(**LAYOUTS[layout])
        )
        model = PeftModel.from_pretrained(base, folder / variant, is_trainable=True)
        logits = logits_of(model, input_ids)
        if not torch.allclose(logits, reference["logits"], **TOLERANCE):
            return f"logits differ by {(logits - reference['logits']).abs().max():.1e}"
        training_pass(model, input_ids)
        found, expected = trainable_gradients(model), reference["gradients"]
        differing = [name for name in expected if not torch.allclose(found[name], expected[name], **TOLERANCE)]
        if sorted(found) != sorted(expected) or differing:
            return f"gradients differ ({len(differing)} of {len(expected)} tensors)"
    except Exception as error:
        return f"fails: {type(error).__name__}: {str(error)[:120]}"
    return "ok"


def worker(folder: Path, model_type: str, layouts: list[str], variants: list[str]) -> None:
    """One of the two ranks: every check of one model type, rank 0 writing the results. One launch per model type,
    so that a model whose own TP path fails part-way (leaving the ranks' collectives out of step) cannot hang the
    next model's checks."""
    dist.init_process_group("gloo")
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S * len(layouts) * (1 + len(variants)), exit=True)
    input_ids = test_architectures._input_ids()
    reference = torch.load(folder / model_type / "reference.pt")
    results = {}
    for layout in layouts:
        results[layout] = {"base": check_base(folder / model_type, layout, reference, input_ids)}
        for variant in variants:
            if isinstance(reference[variant], str):
                results[layout][variant] = reference[variant]
                continue
            case = (folder / model_type, layout, variant, reference[variant], input_ids)
            results[layout][variant] = check_variant(*case)
            gc.collect()
    if dist.get_rank() == 0:
        (folder / model_type / "results.json").write_text(json.dumps(results, indent=1))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def launch(folder: Path, model_type: str, layouts: list[str], variants: list[str]) -> dict[str, dict[str, str]]:
    """Layout -> column -> outcome for one model type, from its own two-process launch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    command += ["--worker", str(folder), "--types", model_type, "--layouts", *layouts, "--variants", *variants]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=environment)
    except subprocess.TimeoutExpired:
        return {layout: {"base": f"launch hung past {LAUNCH_TIMEOUT_S} s"} for layout in layouts}
    results = folder / model_type / "results.json"
    if completed.returncode != 0 or not results.exists():
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {layout: {"base": f"launch failed ({completed.returncode}): {last[:120]}"} for layout in layouts}
    return json.loads(results.read_text())


def markdown(tables: dict[str, dict], variants: list[str]) -> str:
    lines = [
        "# Tensor parallelism on every architecture",
        "",
        "Generated by `python scripts/tensor_parallel_matrix.py` (do not edit by hand) on torch "
        f"{torch.__version__}, Transformers {transformers.__version__}, peft {peft.__version__}: every causal-LM MoE "
        "architecture whose config has a tensor-parallel plan, its support-matrix tiny model split as each layout "
        "below says (two CPU processes, gloo), one adapter per variant loaded with `PeftModel.from_pretrained`, "
        "against one process: the logits, and the adapter's gradients after one training forward and backward. The "
        "*base* column runs Transformers' own path without PERFT (logits, and a backward with only the input "
        "embeddings trainable): where it fails, so does every variant, for a reason that is Transformers', not "
        "PERFT's. PERFT-D takes PERFT-S's path (both add a dense term to the block's output), so it has no column "
        "of its own.",
    ]
    for layout, results in tables.items():
        passed = sum(cell == "ok" for row in results.values() for key, cell in row.items() if key != "base")
        cases = sum(
            key != "base" and not cell.startswith("refused") for row in results.values() for key, cell in row.items()
        )
        lines += [
            "",
            f"## `DistributedConfig({', '.join(f'{k}={v!r}' for k, v in LAYOUTS[layout].items())})`",
            "",
            f"{passed} of {cases} cases equal one process (PERFT-E's refusals by design not counted).",
            "",
            "| model type | base | " + " | ".join(variants) + " |",
            "| --- | --- | " + " | ".join("---" for _ in variants) + " |",
        ]
        for model_type, row in sorted(results.items()):
            cells = [row.get("base", "-")] + [row.get(variant, "-") for variant in variants]
            lines.append(f"| `{model_type}` | " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", help="model types (default: every one with a TP plan)")
    parser.add_argument("--variants", nargs="+", default=["R", "E", "S"], choices=["R", "E", "D", "S"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker is not None:
        worker(args.worker, args.types[0], args.layouts, args.variants)
        return
    model_types = args.types or tensor_parallel_types()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        tables: dict[str, dict] = {layout: {} for layout in args.layouts}
        for model_type in model_types:
            error = prepare(folder / model_type, model_type, args.variants)
            if error is None:
                outcomes = launch(folder, model_type, args.layouts, args.variants)
            else:
                unprepared = f"not prepared (saving the tiny model): {error[:120]}"
                outcomes = {layout: {"base": unprepared} for layout in args.layouts}
            for layout, row in outcomes.items():
                tables[layout][model_type] = row
            print(model_type, outcomes, flush=True)
    args.output.write_text(markdown(tables, args.variants))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
