"""One rank of a PERFT-R run under DeepSpeed ZeRO-3 through Accelerate (CPU accelerator, gloo); launched by
tests/test_sharded_zero3.py.

Usage: python -m torch.distributed.run --nproc_per_node N zero3_worker.py MODE OUTPUT_DIR
MODE ``zero3`` prepares the model with a ZeRO-3 DeepSpeedPlugin (the model is built before the Accelerator, so not
under ``zero.Init``: its parameters are whole when PERFT finds the MoE blocks); MODE ``single`` is the one-process
reference on the whole batch. The adapter is saved through Accelerate's ``get_state_dict`` (ZeRO-3's 16-bit
gather), as the Trainer does.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_perft import PerftConfig  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3


def accelerator_for(mode: str) -> Accelerator:
    if mode == "single":
        return Accelerator(cpu=True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=False, zero3_save_16bit_model=True)
    micro_batch = GLOBAL_BATCH // world
    plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": micro_batch, "train_batch_size": GLOBAL_BATCH})
    return Accelerator(deepspeed_plugin=plugin)


def main(mode: str, output_dir: str) -> None:
    accelerator = accelerator_for(mode)
    torch.manual_seed(0)
    config = PerftConfig(variant="R", r=4, num_experts=4, top_k=2, init_weights=False)
    model = get_peft_model(build_tiny(), config)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, optimiser = accelerator.prepare(model, optimiser)
    tokens = torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    rank = accelerator.process_index
    for step in range(STEPS):
        batch = tokens[step, rank * per_rank : (rank + 1) * per_rank]
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimiser.step()
        optimiser.zero_grad()
    state = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, state_dict=state
    )
    del model, optimiser, state
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # a hang prints every rank's stack instead of stalling
    main(*sys.argv[1:])
