"""One rank of a PERFT run under DeepSpeed ZeRO-3 through Accelerate (CPU accelerator, gloo); launched by
tests/test_sharded_zero3.py.

Usage: python -m torch.distributed.run --nproc_per_node N zero3_worker.py MODE VARIANT BASE_DIR OUTPUT_DIR
Every mode loads the tiny base model saved in BASE_DIR with ``from_pretrained``, as a user does.
MODE ``zero3`` prepares the model with a ZeRO-3 DeepSpeedPlugin and ``zero3_init_flag=False`` (the model is
loaded whole on each rank, then partitioned by ``prepare``); MODE ``zero3-init`` with ``zero3_init_flag=True``
(loaded under DeepSpeed's ``zero.Init``: every base weight is a partitioned placeholder when PERFT adapts the
model); MODE ``single`` is the one-process reference on the whole batch. The adapter is saved through Accelerate's
``get_state_dict`` (ZeRO-3's 16-bit gather), as the Trainer does; ZeRO-3 modes also save it with a plain
``save_pretrained`` on every rank into OUTPUT_DIR/plain.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from peft_perft import PerftConfig  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3


def accelerator_for(mode: str) -> Accelerator:
    if mode == "single":
        return Accelerator(cpu=True)
    # What `accelerate launch` sets; and gloo named, as Accelerate picks a backend only for accelerators (without it
    # each rank would see a world of one and train on the whole batch).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    world = int(os.environ.get("WORLD_SIZE", 1))
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=mode == "zero3-init", zero3_save_16bit_model=True)
    micro_batch = GLOBAL_BATCH // world
    plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": micro_batch, "train_batch_size": GLOBAL_BATCH})
    # Partition every tensor, however small: the tiny model's would otherwise all stay whole on each rank.
    plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def main(mode: str, variant: str, base_dir: str, output_dir: str) -> None:
    accelerator = accelerator_for(mode)
    torch.manual_seed(0)
    routing = {"num_experts": 4, "top_k": 2} if variant == "R" else {}  # E uses the model's experts and routing
    config = PerftConfig(variant=variant, r=4, init_weights=False, **routing)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, optimiser = accelerator.prepare(model, optimiser)
    model.train()
    tokens = torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))
    world = int(os.environ.get("WORLD_SIZE", 1))
    assert accelerator.num_processes == world, f"Accelerate sees {accelerator.num_processes} of {world} processes"
    per_rank = GLOBAL_BATCH // world
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
    if mode != "single":  # also peft's plain save on every rank, which must gather the partitioned adapter itself
        accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "plain"))
    del model, optimiser, state
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # a hang prints every rank's stack instead of stalling
    main(*sys.argv[1:])
