"""One rank of a Trainer run on a model sharded at load (``fsdp_size=2, ep_size=2``); run by tests/test_sharded_load.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 trainer_worker.py BASE OUTPUT_DIR

The Trainer saves a checkpoint at every step, calling ``save_pretrained`` on every rank with ``is_main_process``
true on rank 0 only. Each rank then writes its own final adapter tensors, so the test can check the ranks agree
and that the last checkpoint holds them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lifecycle import leave_process_group, run_failing_on_hang
from peft import get_peft_model
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig
from peft_perft.sharding import gathered_adapter_state_dict


class TokenDataset(Dataset):
    def __init__(self) -> None:
        self.tokens = torch.randint(3, 64, (8, 8), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main(base: str, output_dir: str) -> None:
    dist.init_process_group("gloo")
    config = DistributedConfig(fsdp_size=2, ep_size=2)
    model = AutoModelForCausalLM.from_pretrained(base, distributed_config=config)
    torch.manual_seed(dist.get_rank())
    model = get_peft_model(model, PerftConfig(variant="R", r=4, num_experts=4, top_k=2, init_weights=False))
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=0.1,
        save_steps=1,
        save_strategy="steps",
        save_only_model=True,  # Transformers cannot checkpoint the optimizer of a model sharded at load
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=TokenDataset())
    trainer.train()
    torch.save(gathered_adapter_state_dict(model), f"{output_dir}/final.rank{dist.get_rank()}.pt")
    del trainer, model
    leave_process_group()


if __name__ == "__main__":
    run_failing_on_hang(main)
