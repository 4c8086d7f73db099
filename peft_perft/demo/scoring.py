"""What the demo measures on the held-out split: greedy-generation accuracy before and after training, and the
reload check (the saved adapter, loaded on a fresh base, reproduces the trained model's logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedTokenizerBase

from peft_perft.evaluation import generate_batch
from peft_perft.workflow import ALL_TASKS, DemoTask, load_base_model


@torch.no_grad()
def measure_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: DemoTask, batch_size: int = 64
) -> dict[str, float]:
    """Greedy-generation accuracy on the held-out split: overall (key ``all``) and per sub-task."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=task.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    rows = list(task.test)
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        generated = generate_batch(model, tokenizer, [row["prompt"] for row in batch], config)
        for row, text in zip(batch, generated, strict=True):
            correct = task.scorer(text, row)
            hits.setdefault(row.get("task", ALL_TASKS), []).append(correct)
            if row.get("task", ALL_TASKS) != ALL_TASKS:
                hits.setdefault(ALL_TASKS, []).append(correct)
    return {name: sum(values) / len(values) for name, values in sorted(hits.items())}


@torch.no_grad()
def check_reload(
    trained: torch.nn.Module,
    model_name_or_path: str,
    adapter_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    test: Dataset,
    device: torch.device,
    quantize: str | None = None,
    num_examples: int = 16,
) -> dict[str, Any]:
    """Load a fresh base, put the saved adapter on it with PeftModel.from_pretrained, compare the logits.

    On a CPU the comparison is exact (the same float32 operations in the same order); on a GPU, kernels may
    reorder sums, so a difference within bfloat16 rounding of the logit scale is accepted.
    """
    base = load_base_model(model_name_or_path, device, quantize)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    texts = [row["prompt"] + row["completion"] for row in test.select(range(min(num_examples, len(test))))]
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
    expected = trained(**batch).logits.float()
    actual = reloaded(**batch).logits.float()
    max_abs_diff = (expected - actual).abs().max().item()
    tolerance = 0.0 if device.type == "cpu" else 1e-2 * expected.abs().max().item()
    return {"passed": max_abs_diff <= tolerance, "max_abs_diff": max_abs_diff, "tolerance": tolerance}
