"""Routing monitor: how tokens spread over the PERFT-R experts and the base model's experts, per adapted layer.

`RoutingMonitor` counts, on the device and inside forward hooks, the tokens each expert receives; it reads
the routing the model computed anyway (no extra forward, no second router call) and moves numbers to the host
only when asked (one transfer per read). `RoutingMonitorCallback` drives it from a `Trainer`: at every logging
step it adds the scalars to the Trainer's logs (so every ``report_to`` backend gets them), warns when a PERFT-R
router collapses, and writes layer x expert heatmaps at the end. `routing_report` gives the same figures for a
dataset, as data and pictures.

The code lives in flat modules next to this one, which imports only from them: `monitor_stats` (the figures,
`RoutingReport`, collapse criteria, heatmaps), `monitor_counting` (`RoutingMonitor`), `monitor_callback` (the
Trainer integration) and `monitor_dataset` (`routing_report`). Import the public names from here.
"""

from .monitor_callback import RoutingMonitorCallback, add_routing_monitor
from .monitor_counting import RoutingMonitor
from .monitor_dataset import routing_report
from .monitor_stats import CollapseCriteria, RouterCollapseWarning, RouterStats, RoutingReport
from .trace import RoutingTrace, routing_trace

__all__ = [
    "CollapseCriteria",
    "RouterCollapseWarning",
    "RouterStats",
    "RoutingMonitor",
    "RoutingMonitorCallback",
    "RoutingReport",
    "RoutingTrace",
    "add_routing_monitor",
    "routing_report",
    "routing_trace",
]
