"""The two ends every multi-process test worker run as a script shares (imported by its file name, as the script's
folder is on ``sys.path``): a hang that fails loudly, and a clean exit from the process group."""

from __future__ import annotations

import faulthandler
import gc
import sys
from collections.abc import Callable

import torch.distributed as dist


def run_failing_on_hang(main: Callable[..., None], seconds: int = 150) -> None:
    """``main(*sys.argv[1:])``; a hang prints every rank's stack and exits after ``seconds`` instead of stalling."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    main(*sys.argv[1:])


def leave_process_group() -> None:
    """Collect the freed models while the process group still exists (torch 2.13 + gloo can abort at exit
    otherwise; the caller deletes its references first), wait for every rank, and destroy the group."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
