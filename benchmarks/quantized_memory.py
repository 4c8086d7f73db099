"""Resident memory of an OLMoE-shaped model with PERFT-R attached: fp32 experts vs torchao int8 experts.

Each setting runs in a fresh Python process (so that one's freed memory does not hide in the other's figure): it
builds the model from its config (random weights, fp32), quantizes the fused expert weights for ``int8``
(peft_perft.quantization.quantize_experts_int8), attaches PERFT-R, runs one training step, and reports

- resident: the process's resident set size after the step (freed heap handed back to the OS with glibc's
  malloc_trim, so that the fp32 weights int8 replaced do not count), minus the same process's before the model;
- weights: the bytes of the model's tensors as stored (int8 data and scales for quantized experts).

    python benchmarks/quantized_memory.py               # olmoe_step.py's CPU shape (hidden 512, 64 experts), 16 layers
    python benchmarks/quantized_memory.py --layers 4    # quicker
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys

import psutil
import torch
from olmoe_step import model_config, perft_config
from transformers import OlmoeForCausalLM

EXPERTS_STORAGE = ("fp32", "int8")


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored: a torchao int8 tensor counts its int8 data and its scales."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        inner = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", ())] or [tensor]
        total += sum(part.numel() * part.element_size() for part in inner)
    return total


def release_freed_heap() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc only; elsewhere the figure may be higher)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(storage: str, layers: int) -> dict:
    """One setting, in this process: build, quantize (int8), attach PERFT-R, one step; memory in MiB."""
    from peft import get_peft_model

    from peft_perft.quantization import quantize_experts_int8

    torch.manual_seed(0)
    process = psutil.Process()
    release_freed_heap()
    before = process.memory_info().rss
    model = OlmoeForCausalLM(model_config("cpu", layers))
    if storage == "int8":
        quantize_experts_int8(model)
    model = get_peft_model(model, perft_config("R", "auto"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    release_freed_heap()
    mib = 2**20
    return {
        "experts": storage,
        "layers": layers,
        "resident_mib": round((process.memory_info().rss - before) / mib),
        "weights_mib": round(stored_bytes(model) / mib),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (OLMoE-1B-7B has 16)")
    parser.add_argument("--one", choices=EXPERTS_STORAGE, help=argparse.SUPPRESS)  # the child process's setting
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(measure(args.one, args.layers)))
        return 0
    rows = []
    for storage in EXPERTS_STORAGE:
        command = [sys.executable, __file__, "--one", storage, "--layers", str(args.layers)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"OLMoE shape: hidden 512, 64 experts top-8, expert width 256, {args.layers} layers; PERFT-R r=16, 16 experts"
    )
    print("| experts | resident (MiB) | weights as stored (MiB) |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['experts']} | {row['resident_mib']} | {row['weights_mib']} |")
    print(f"resident ratio fp32 / int8: {rows[0]['resident_mib'] / rows[1]['resident_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
