"""One rank of a Transformers Trainer run under DeepSpeed ZeRO-3 (CPU accelerator, gloo); launched by
tests/test_sharded_zero3.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 zero3_trainer_worker.py VARIANT BASE_DIR OUTPUT_DIR

``TrainingArguments(deepspeed=<ZeRO-3 dict>)`` is created before ``from_pretrained``, so the model is loaded under
DeepSpeed's ``zero.Init`` (what ``zero3_init_flag: true`` gives under ``accelerate launch``): every base weight is a
partitioned placeholder when PERFT adapts it. The Trainer then trains on sequential batches of 2 per rank for
STEPS SGD steps (the one-process reference in zero3_worker.py: the same 3 batches of 4, lr 0.5, no clipping)
and saves with ``save_model``. Afterwards each rank saves once more in the mixed way that cannot gather: rank 0
plain, rank 1 with ``is_main_process=False``; rank 0 must fail with PERFT's error instead of hanging, and writes
the message to OUTPUT_DIR/mixed_save_error.txt.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PERFT_ZERO3_SAVE_JOIN_TIMEOUT_S"] = "5"  # the mixed save below fails fast

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import PartialState  # noqa: E402
from lifecycle import leave_process_group, run_failing_on_hang
from peft import get_peft_model  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from peft_perft import PerftConfig  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every tensor of the tiny model, PERFT's included
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


class Batches(Dataset):
    """The reference's STEPS global batches of GLOBAL_BATCH sequences, in order (a sequential sampler splits
    each global batch into the ranks' halves, as the reference slices it)."""

    def __init__(self) -> None:
        tokens = torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))
        self.tokens = tokens.reshape(STEPS * GLOBAL_BATCH, 8)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main(variant: str, base_dir: str, output_dir: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    # On GPUs the Trainer sets this state up itself; Accelerate picks a process-group backend only for
    # accelerators, so on CPU the DeepSpeed state is made first with gloo named and the Trainer told to use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    arguments = TrainingArguments(
        output_dir=output_dir,
        deepspeed=ZERO3,
        accelerator_config={"use_configured_state": True},
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        logging_steps=1,
    )
    assert arguments.world_size == world, f"the Trainer sees {arguments.world_size} of {world} processes"
    torch.manual_seed(0)  # as the reference, before loading
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # under zero.Init: the arguments enabled ZeRO-3
    assert all(hasattr(parameter, "ds_id") for parameter in base.parameters()), "not loaded under zero.Init"
    routing = {"num_experts": 4, "top_k": 2} if variant == "R" else {}
    model = get_peft_model(base, PerftConfig(variant=variant, r=4, init_weights=False, **routing))
    trainer = Trainer(model=model, args=arguments, train_dataset=Batches())
    trainer.train()
    trainer.save_model(output_dir)
    try:
        if dist.get_rank() == 0:
            model.save_pretrained(os.path.join(output_dir, "mixed"))
        else:
            model.save_pretrained(os.path.join(output_dir, "mixed"), is_main_process=False)
    except RuntimeError as error:
        with open(os.path.join(output_dir, "mixed_save_error.txt"), "w") as file:
            file.write(str(error))
    del trainer, model, base
    leave_process_group()


if __name__ == "__main__":
    run_failing_on_hang(main)
