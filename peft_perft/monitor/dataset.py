"""`routing_report`: the routing monitor's figures for a whole dataset, outside training, as data and pictures.

It accepts ready batches, a DataLoader, or raw examples (strings, token ids, text / prompt / messages rows) and
pads them into batches itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .counting import RoutingMonitor
from .stats import REPORT_FILE_NAME, RoutingReport


@torch.no_grad()
def routing_report(
    model: nn.Module,
    dataset_or_batches: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    description: str | None = None,
) -> RoutingReport:
    """Routing statistics of ``model`` over a dataset, as data (`RoutingReport.to_dict`) and pictures.

    ``dataset_or_batches`` is a batch (a mapping with an ``input_ids`` tensor), an iterable of such batches
    (e.g. a DataLoader), or an iterable of examples: strings, or mappings with ``input_ids`` (a list) or with
    ``text`` / ``prompt`` (+ ``completion``) / ``messages`` (those need ``tokenizer``), e.g. a `datasets.Dataset`.
    The model runs in eval mode, its mode is restored afterwards. With ``output_dir`` the heatmaps and
    ``routing_report.json`` are written there. ``description`` names the data in the report and the heatmaps'
    titles (default: the number of examples).
    """
    if batch_size < 1:
        raise ValueError(f"routing_report: batch_size={batch_size} must be at least 1.")
    was_training = model.training
    device = next(model.parameters()).device
    monitor = RoutingMonitor(model, measure_drift=False)
    try:
        model.eval()
        examples = 0
        with monitor:
            for batch in _batches(dataset_or_batches, tokenizer, batch_size, _pad_token_id(model, tokenizer)):
                model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False)
                examples += len(batch["input_ids"])
        report = monitor.report()
        report.source = description or f"{examples:,} examples"
    finally:
        model.train(was_training)
    if output_dir is not None:
        report.save_heatmaps(output_dir)
        report.save_json(Path(output_dir) / REPORT_FILE_NAME)
    return report


def _batches(data: Any, tokenizer: Any, batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches (input_ids, attention_mask) from any of the inputs `routing_report` accepts."""
    if isinstance(data, Mapping) and isinstance(data.get("input_ids"), torch.Tensor):
        yield _model_inputs(data)
        return
    pending: list[list[int]] = []
    for item in data:
        if (
            isinstance(item, Mapping)
            and isinstance(item.get("input_ids"), torch.Tensor)
            and item["input_ids"].dim() == 2
        ):
            yield _model_inputs(item)
            continue
        pending.append(_example_ids(item, tokenizer))
        if len(pending) == batch_size:
            yield _padded(pending, pad_token_id)
            pending = []
    if pending:
        yield _padded(pending, pad_token_id)


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids) if mask is None else mask}


def _example_ids(item: Any, tokenizer: Any) -> list[int]:
    """Token ids of one example (fields that are missing or None, as in datasets with mixed rows, are skipped)."""
    fields = {key: value for key, value in item.items() if value is not None} if isinstance(item, Mapping) else {}
    if "input_ids" in fields:
        return [int(token) for token in fields["input_ids"]]
    if tokenizer is None:
        raise ValueError(
            "routing_report got text examples but no tokenizer: pass tokenizer=... or examples with 'input_ids'."
        )
    if isinstance(item, str):
        return tokenizer(item).input_ids
    if "messages" in fields:
        return list(tokenizer.apply_chat_template(fields["messages"], tokenize=True, return_dict=True)["input_ids"])
    if "text" in fields or "prompt" in fields:
        text = fields["text"] if "text" in fields else fields["prompt"] + fields.get("completion", "")
        return tokenizer(text).input_ids
    raise TypeError(
        f"routing_report cannot read an example of type {type(item).__name__}"
        f"{' with keys ' + str(sorted(item)) if isinstance(item, Mapping) else ''}: expected a string or a mapping "
        f"with 'input_ids', 'text', 'prompt' or 'messages'."
    )


def _padded(examples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_token_id(model: nn.Module, tokenizer: Any) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0
