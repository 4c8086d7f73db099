"""The pilot's instruments: step time and tokens, peak memory, per-example held-out loss, and the machine's state.

Each measures one configuration the same way as every other, so that ``peft_perft.pilot`` can compare them: GPU
work is waited for before a step's clock stops, memory is the allocator's peak on a GPU and sampled RSS on a CPU,
and held-out losses are kept per example for paired comparisons. Re-exported by ``peft_perft.pilot``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

IGNORED_LABEL = -100


class StepTimer(TrainerCallback):
    """Wall time and input tokens of every optimizer step (GPU work is waited for, so the times are real)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._started = 0.0
        self._tokens_before = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self._started = time.perf_counter()
        self._tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self.seconds.append(time.perf_counter() - self._started)
        self.tokens.append(state.num_input_tokens_seen - self._tokens_before)


class PeakMemory:
    """Peak memory while a block runs: torch's allocator peak on a GPU, the sampled process RSS on a CPU."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


@torch.no_grad()
def held_out_losses(trainer: SFTTrainer) -> list[tuple[float, int]]:
    """Per held-out example: mean next-token loss over its completion tokens, and how many there were.

    The plain language-model loss (no load-balancing term), from TRL's own tokenisation and label masking, kept
    per example so that configurations can be compared example by example.
    """
    model = trainer.model
    was_training = model.training
    model.eval()
    per_example = []
    for batch in trainer.get_eval_dataloader():
        labels = batch["labels"].to(model.device)
        outputs = model(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            output_router_logits=False,
            use_cache=False,
        )
        targets = labels[:, 1:]
        token_losses = F.cross_entropy(
            outputs.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORED_LABEL, reduction="none"
        )
        counts = (targets != IGNORED_LABEL).sum(dim=1)
        sums = token_losses.sum(dim=1)
        per_example += [(s / c, int(c)) for s, c in zip(sums.tolist(), counts.tolist(), strict=True) if c > 0]
    model.train(was_training)
    return per_example


def token_weighted(example_losses: list[tuple[float, int]]) -> float:
    """Mean loss over every completion token of the held-out slice."""
    return sum(mean * count for mean, count in example_losses) / sum(count for _, count in example_losses)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> float | None:
    """The one-minute load average (runnable processes) where the system reports it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
