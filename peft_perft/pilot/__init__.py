"""``peft-perft pilot``: PERFT variants and LoRA measured on your model and a slice of your data before a full run.

``run`` trains and measures the grid and holds the command line, ``report`` records and presents the results
(table, JSON, recommendation), ``pictures`` draws their plot, ``measure`` holds the instruments (step timer, peak
memory, held-out losses).
"""

from .report import CandidateResult, PilotReport, PilotSettings, recommend
from .run import add_cli_arguments, run_cli, run_pilot

__all__ = ["CandidateResult", "PilotReport", "PilotSettings", "add_cli_arguments", "recommend", "run_cli", "run_pilot"]
