"""One rank of a small PERFT-R training run under Accelerate; launched by tests/test_distributed.py.

Usage: python -m torch.distributed.run --nproc_per_node N train_worker.py MODE OUTPUT
MODE is ``ddp`` (Accelerate's multi-process CPU mode, DDP over gloo) or ``fsdp2`` (torch's ``fully_shard`` on the
same process group, since Accelerate enables FSDP only on accelerators); with one process it is the single-process
reference. Every rank trains on its slice
of the same global batch. The PERFT-R routers are set so that experts 2 and 3 never receive a token (top-1 between
+v and -v rows always picks expert 0 or 1), to show that experts without tokens neither hang nor raise
unused-parameter errors; the worker checks from the routing records that they really got none.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_perft import PerftConfig, PerftMoeBlock  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3


def shard_with_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) per decoder layer and at the root; Accelerate only enables FSDP on accelerators."""
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def main(mode: str, output: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    # Top-1 weights left unnormalised (a renormalised single weight is the constant 1, giving the router no gradient).
    config = PerftConfig(variant="R", r=4, num_experts=4, top_k=1, normalize_top_k=False, init_weights=False)
    model = get_peft_model(build_tiny(), config)
    blocks = [module for module in model.modules() if isinstance(module, PerftMoeBlock)]
    with torch.no_grad():
        for block in blocks:
            router = block.perft_router["default"]
            direction = router[0].clone()
            router.zero_()
            router[0], router[1] = 100 * direction, -100 * direction
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if ".perft_" in name}
    if mode == "fsdp2" and accelerator.num_processes > 1:
        model = shard_with_fsdp2(model)
        assert all(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 must shard every parameter"
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    else:
        model, optimiser = accelerator.prepare(model, optimiser)
    model.train()
    tokens = torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    for step in range(STEPS):
        batch = tokens[step, accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        for block in blocks:
            used = torch.bincount(block.routing_records["default"].expert_index.flatten(), minlength=4)
            assert used[2:].sum() == 0 and used.sum() == batch.numel(), used
        accelerator.backward(loss)
        optimiser.step()
        optimiser.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # As the Trainer saves: every rank calls save_pretrained, only the main process writes.
    accelerator.unwrap_model(model).save_pretrained(f"{output}.adapter", is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        trained = {name: tensor.detach().cpu() for name, tensor in state.items() if ".perft_" in name}
        torch.save({"initial": initial, "trained": trained}, output)
    # Free the sharded tensors while the process group still exists: destroying them afterwards can abort a
    # rank at exit ("terminate called without an active exception") once in a while.
    del model, optimiser, state
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
