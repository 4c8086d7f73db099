"""One rank of ``examples/sft_perft.py`` (TRL's SFTTrainer) on a model sharded at load (``--fsdp_size 2 --ep_size
2``); run by tests/test_sharded_load.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 trainer_worker.py BASE DATASET OUTPUT_DIR

The script's own flags shard the model and train PERFT-R, saving a checkpoint at every step: the Trainer calls
``save_pretrained`` on every rank with ``is_main_process`` true on rank 0 only. Each rank then writes its own
final adapter tensors, so the test can check the ranks agree and that the last checkpoint holds them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lifecycle import leave_process_group, run_failing_on_hang

from peft_perft.parallel.saving import gathered_adapter_state_dict

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import sft_perft  # noqa: E402


def main(base: str, dataset: str, output_dir: str) -> None:
    argv = ["--model_name_or_path", base, "--dataset_path", dataset, "--output_dir", output_dir]
    argv += ["--fsdp_size", "2", "--ep_size", "2"]
    argv += ["--perft_variant", "R", "--perft_r", "4", "--perft_num_experts", "4", "--perft_top_k", "2"]
    argv += ["--perft_init_weights", "false", "--learning_rate", "0.01", "--max_steps", "2", "--save_steps", "1"]
    argv += ["--per_device_train_batch_size", "1", "--report_to", "none", "--disable_tqdm", "true"]
    argv += ["--routing_monitor", "false", "--use_cpu"]
    trainer = sft_perft.main(argv)
    torch.save(gathered_adapter_state_dict(trainer.model), f"{output_dir}/final.rank{dist.get_rank()}.pt")
    del trainer
    leave_process_group()


if __name__ == "__main__":
    run_failing_on_hang(main)
