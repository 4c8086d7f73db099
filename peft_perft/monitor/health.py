"""Numerical health: find non-finite adapter outputs and router probabilities, and name the layer.

`NumericsGuard` flags, on the device, every adapted block whose output or PERFT-R router probabilities were not
finite in any forward since the last check; `check` moves the flags to the host once and raises
`NonFiniteError` with the layer names. `NumericsCallback` runs that check at every Trainer logging step, so a
diverging run stops within one logging window instead of training on NaNs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..layer import PerftMoeBlock


class NonFiniteError(FloatingPointError):
    """An adapted layer produced NaN or infinity."""


class NumericsGuard:
    """Device-side NaN/inf flags per adapted block; attach once, call `check` when convenient."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = {name: module for name, module in model.named_modules() if isinstance(module, PerftMoeBlock)}
        if not self.blocks:
            raise ValueError("NumericsGuard found no PERFT layer in this model; apply a PerftConfig first.")
        device = next(next(iter(self.blocks.values())).parameters()).device
        self._output_flags = torch.zeros(len(self.blocks), dtype=torch.bool, device=device)
        self._router_flags = torch.zeros(len(self.blocks), dtype=torch.bool, device=device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> NumericsGuard:
        """Start watching every adapted block."""
        if not self._handles:
            for position, block in enumerate(self.blocks.values()):
                self._handles.append(block.register_forward_hook(self._watcher(position)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> NumericsGuard:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def _watcher(self, position: int):
        @torch.no_grad()
        def flag_non_finite(block: PerftMoeBlock, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._output_flags[position] |= ~torch.isfinite(hidden).all()
            for record in block.routing_records.values():
                if record.router_logits is not None:
                    self._router_flags[position] |= ~torch.isfinite(record.router_logits).all()

        return flag_non_finite

    def check(self) -> None:
        """Raise `NonFiniteError` naming every layer flagged since the last check (one host transfer)."""
        flags = torch.stack([self._output_flags, self._router_flags]).cpu()
        self._output_flags.zero_()
        self._router_flags.zero_()
        names = list(self.blocks)
        problems = [f"{names[i]}: non-finite block output (base + adapter)" for i in flags[0].nonzero().flatten()]
        problems += [f"{names[i]}: non-finite PERFT-R router probabilities" for i in flags[1].nonzero().flatten()]
        if problems:
            raise NonFiniteError(
                "PERFT found NaN or infinite values:\n  "
                + "\n  ".join(problems)
                + "\nLower the learning rate or router_init_std, check the data for empty or extreme inputs, "
                "or train the adapter in float32."
            )


class NumericsCallback(TrainerCallback):
    """Check the guard at every logging step and stop training with `NonFiniteError` naming the layers."""

    def __init__(self) -> None:
        self.guard: NumericsGuard | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        self.guard = NumericsGuard(model).attach()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.guard is not None:
            self.guard.check()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.guard is not None:
            self.guard.check()
            self.guard.detach()
