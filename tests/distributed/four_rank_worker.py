"""The 4-rank runs of tests/test_sharded_load.py, in one launch so that the start and the imports are paid once.

Usage: python -m torch.distributed.run --nproc_per_node 4 four_rank_worker.py BASE ERRORS [CASE ...]

First, for each layout of REPLICATED_EXPERTS (each expert on more than one rank), PERFT-E sharded like the experts
must be refused at ``get_peft_model``: each rank writes, per layout, the error it got (or None) to ERRORS.rankN.
Then each CASE (``LAYOUT,BASE,VARIANT,OUTPUT``, as in sharded_worker.py) runs on layouts that need 4 ranks, such
as TP+EP+FSDP.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from lifecycle import leave_process_group, run_failing_on_hang
from peft import get_peft_model
from sharded_worker import run_cases
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig

REPLICATED_EXPERTS = {
    "efsdp": {"fsdp_size": 4, "ep_size": 2},  # efsdp_size = fsdp_size * tp_size / ep_size = 2 copies per expert
    "dp_replicate": {"dp_replicate_size": 2, "fsdp_size": 2, "ep_size": 2},  # 2 data-parallel replicas
}


def record_refusals(base: str, output: str) -> None:
    errors: dict[str, str | None] = {}
    for name, settings in REPLICATED_EXPERTS.items():
        config = DistributedConfig(**settings, ep_implementation="perft")
        model = AutoModelForCausalLM.from_pretrained(base, distributed_config=config)
        try:
            get_peft_model(model, PerftConfig(variant="E", r=4))
            errors[name] = None
        except NotImplementedError as error:
            errors[name] = str(error)
        del model
        gc.collect()
    torch.save(errors, f"{output}.rank{dist.get_rank()}")


def main(base: str, errors_output: str, *cases: str) -> None:
    dist.init_process_group("gloo")
    record_refusals(base, errors_output)
    run_cases(cases)
    leave_process_group()


if __name__ == "__main__":
    run_failing_on_hang(main, seconds=110)
