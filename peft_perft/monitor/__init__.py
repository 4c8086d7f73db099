"""Routing monitor: how tokens spread over the PERFT-R experts and the base model's experts, per adapted layer.

`RoutingMonitor` counts, on the device and inside forward hooks, the tokens each expert receives; it reads
the routing the model computed anyway (no extra forward, no second router call) and moves numbers to the host
only when asked (one transfer per read). `RoutingMonitorCallback` drives it from a `Trainer`: at every logging
step it adds the scalars to the Trainer's logs (so every ``report_to`` backend gets them), warns when a PERFT-R
router collapses, and writes layer x expert heatmaps at the end. `routing_report` gives the same figures for a
dataset, as data and pictures.

`routing_trace` gives per-token routing for one input (the audit trace), `modality_load` splits it by modality
(image and text tokens of a vision-language model), and `NumericsGuard` /
`NumericsCallback` flag non-finite adapter outputs per layer. The code lives in the modules of this package:
`stats` (the figures, `RoutingReport`, collapse criteria), `counting` (`RoutingMonitor`), `callback`
(the Trainer integration), `dataset` (`routing_report`), `trace` (`routing_trace`), `modality`, `pictures` (every
picture: heatmaps, the trace's grids, the modality picture) and `health` (numerical health). Import the public names
from here.
"""

from .callback import RoutingMonitorCallback, add_routing_monitor
from .counting import RoutingMonitor
from .dataset import routing_report
from .health import NonFiniteError, NumericsCallback, NumericsGuard
from .modality import ModalityLoad, modality_load, stack_load
from .pictures import draw_load_heatmap, draw_modality_load
from .stats import CollapseCriteria, RouterCollapseWarning, RouterStats, RoutingReport
from .trace import RoutingTrace, routing_trace

__all__ = [
    "CollapseCriteria",
    "ModalityLoad",
    "NonFiniteError",
    "NumericsCallback",
    "NumericsGuard",
    "RouterCollapseWarning",
    "RouterStats",
    "RoutingMonitor",
    "RoutingMonitorCallback",
    "RoutingReport",
    "RoutingTrace",
    "add_routing_monitor",
    "draw_load_heatmap",
    "draw_modality_load",
    "modality_load",
    "routing_report",
    "routing_trace",
    "stack_load",
]
