"""Selective PERFT-E sharded over expert parallelism, one rank's part; launched by tests/test_selective_experts.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 selective_worker.py LAYOUT BASE OUTPUT CONFIG [ADAPTER]

Loads BASE sharded as sharded_worker.LAYOUTS[LAYOUT] says (``fsdp_ep_sharded``: ``fsdp_size=2, ep_size=2,
ep_implementation="perft"``; ``tp``: ``tp_size=2``) and adds the selective adapter of CONFIG (the
PerftConfig's fields as JSON; seeded with the rank: rank 0's values must reach every rank), or loads ADAPTER.
Records the rows each rank holds, the per-rank counts (`expert_parallel_balance`) and imbalance warnings, the
logits, the first step's gradients (this rank's rows), the adapter gathered whole before and after training, and
saves it with ``is_main_process`` on rank 0 only (as the Trainer does); then initialises the adapter again
(``init_perft_weights``) and records it. Writes OUTPUT.rankN.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from sharded_worker import adapter_elements_held, batches, load_base, train

from peft_perft import PerftConfig
from peft_perft.parallel.expert_parallel import SelectedExpertsImbalanceWarning, expert_parallel_balance
from peft_perft.parallel.saving import gathered_adapter_state_dict


def record(layout: str, base: str, output: str, config: PerftConfig, adapter: str | None) -> dict:
    rank = dist.get_rank()
    base_model = load_base(base, layout, "E")
    torch.manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if adapter is None:
            model = get_peft_model(base_model, config)
        else:
            model = PeftModel.from_pretrained(base_model, adapter)
    imbalance = [str(w.message) for w in caught if issubclass(w.category, SelectedExpertsImbalanceWarning)]
    result = {"held": adapter_elements_held(model), "balance": expert_parallel_balance(model), "warned": imbalance}
    tokens = batches()
    with torch.no_grad():
        result["logits"] = model(input_ids=tokens[0]).logits
    if adapter is not None:
        return result
    result["initial"] = gathered_adapter_state_dict(model)
    result.update(train(model, layout, tokens))
    result["trained"] = gathered_adapter_state_dict(model)
    model.save_pretrained(f"{output}.adapter", is_main_process=rank == 0)
    torch.manual_seed(100 + rank)  # initialised again from differently seeded ranks: rank 0's values must win
    model.base_model.init_perft_weights()
    result["reinitialised"] = gathered_adapter_state_dict(model)
    result["reinitialised_held"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".perft_" in n}
    return result


def main(layout: str, base: str, output: str, config: str, adapter: str | None = None) -> None:
    from lifecycle import leave_process_group  # by its file name, as a script

    dist.init_process_group("gloo")
    settings = PerftConfig(**json.loads(config))
    torch.save(record(layout, base, output, settings, adapter), f"{output}.rank{dist.get_rank()}")
    leave_process_group()


if __name__ == "__main__":
    from lifecycle import run_failing_on_hang

    run_failing_on_hang(main, seconds=240)
