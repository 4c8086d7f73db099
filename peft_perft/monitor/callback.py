"""Trainer integration of the routing monitor: `RoutingMonitorCallback` and `add_routing_monitor`.

At every logging step the callback adds the routing scalars to the Trainer's logs (so every ``report_to``
backend gets them), warns when a PERFT-R router collapses, and writes layer x expert heatmaps at the end.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from .counting import RoutingMonitor
from .stats import (
    PERFT_ROUTER,
    REPORT_FILE_NAME,
    CollapseCriteria,
    RouterCollapseWarning,
    RouterStats,
    RoutingReport,
)

# The public module's name, so that logging configured for `peft_perft.monitor` still gets collapse warnings.


class RoutingMonitorCallback(TrainerCallback):
    """Logs routing statistics with the Trainer's own reporting, warns on collapse, draws heatmaps at the end.

    Numbers are collected on the device by a `RoutingMonitor` during training forward passes and moved to the
    host once per logging step. They are added to the Trainer's ``logs`` (and its ``log_history``); backends of
    ``report_to`` see them when this callback runs before theirs, which `add_routing_monitor` arranges.

    Args:
        output_dir: where `on_train_end` writes heatmaps and ``routing_report.json``; default
            ``<args.output_dir>/routing``. None with ``save_at_end=False`` writes nothing.
        per_layer: also log every layer's figures (many scalars on large models).
        track_base: also monitor the base model's routing.
        criteria: when a PERFT-R router counts as collapsed.
        save_at_end: write the heatmaps and report when training ends (main process only).
    """

    def __init__(
        self,
        *,
        output_dir: str | Path | None = None,
        per_layer: bool = False,
        track_base: bool = True,
        criteria: CollapseCriteria | None = None,
        save_at_end: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.per_layer = per_layer
        self.track_base = track_base
        self.criteria = criteria or CollapseCriteria()
        self.save_at_end = save_at_end
        self.monitor: RoutingMonitor | None = None
        self.collapse_events: list[dict[str, Any]] = []
        self.saved_files: list[Path] = []
        self._streaks: dict[tuple[str | None, str], int] = {}
        self._final_report: RoutingReport | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if self.monitor is not None:
            self.monitor.detach()
        self.monitor = RoutingMonitor(
            model, track_base=self.track_base, training_only=True, reduce_across_processes=True
        ).attach()
        self._streaks.clear()
        self._final_report = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if self.monitor is None or logs is None or "loss" not in logs:
            return
        window = self.monitor.read()
        if window.empty:
            return
        added = {key: value for key, value in self._window_scalars(window).items() if key not in logs}
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        self._check_collapse(window, state)

    def _window_scalars(self, window: RoutingReport) -> dict[str, float]:
        scalars = window.scalars(self.per_layer)
        if window.base_aux_loss is not None:
            scalars["aux_loss"] = window.base_aux_loss
        return scalars

    def _check_collapse(self, window: RoutingReport, state: TrainerState) -> None:
        collapsed = {(stats.adapter, stats.module): reason for stats, reason in window.collapsed(self.criteria)}
        for stats in window.routers:
            key = (stats.adapter, stats.module)
            if stats.router != PERFT_ROUTER or not stats.tokens:
                continue
            self._streaks[key] = self._streaks.get(key, 0) + 1 if key in collapsed else 0
            if self._streaks[key] == self.criteria.patience:
                self._warn_collapse(stats, collapsed[key], state)

    def _warn_collapse(self, stats: RouterStats, reason: str, state: TrainerState) -> None:
        self.collapse_events.append(
            {
                "step": state.global_step,
                "layer": stats.layer,
                "module": stats.module,
                "adapter": stats.adapter,
                "reason": reason,
            }
        )
        if not state.is_world_process_zero:
            return
        message = (
            f"PERFT-R router of adapter {stats.adapter!r} in layer {stats.layer} ({stats.module}) has collapsed at "
            f"step {state.global_step}: {reason} over the last {self.criteria.patience} logging window(s). "
            f"Consider a larger router_aux_loss_coef, a lower learning rate, or fewer experts (num_experts)."
        )
        warnings.warn(message, RouterCollapseWarning, stacklevel=2)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.monitor is None:
            return
        self._final_report = self.monitor.report()
        self._final_report.source = f"training, steps 1-{state.global_step}"
        self.monitor.detach()
        if self.save_at_end and state.is_world_process_zero:
            directory = self.output_dir or Path(args.output_dir) / "routing"
            self.saved_files = [*self._final_report.save_heatmaps(directory)]
            self.saved_files.append(self._final_report.save_json(directory / REPORT_FILE_NAME))

    def report(self) -> RoutingReport:
        """Statistics over the whole run so far (or the finished run), e.g. to inspect mid-training."""
        if self._final_report is not None:
            return self._final_report
        if self.monitor is None:
            raise RuntimeError("RoutingMonitorCallback.report() is only available once training has begun.")
        report = self.monitor.report()
        report.source = "training so far"
        return report

    def save_heatmaps(self, directory: str | Path) -> list[Path]:
        """Draw the heatmaps of the run so far on demand."""
        return self.report().save_heatmaps(directory)


def add_routing_monitor(trainer: Trainer, **options: Any) -> RoutingMonitorCallback:
    """Add a `RoutingMonitorCallback` to ``trainer`` ahead of the reporting callbacks, so that TensorBoard, W&B
    and the other ``report_to`` backends receive its scalars. Options are those of `RoutingMonitorCallback`."""
    callback = RoutingMonitorCallback(**options)
    callbacks = trainer.callback_handler.callbacks
    position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    callbacks.insert(position, callback)
    return callback
