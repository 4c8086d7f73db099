"""PERFT-R on OLMoE with TRL's SFTTrainer: the lines to copy. Real runs: examples/sft_perft.py.

Needs the Hugging Face Hub (it downloads allenai/OLMoE-1B-7B-0924, about 14 GB, and the trl-lib/tldr data set) and,
in practice, a GPU; on a CPU it runs in float32, slowly. Offline, try `peft-perft demo` or examples/tiny_olmoe.py.
"""

import argparse

# Parsed before the heavy imports, so that --help answers at once and downloads nothing.
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from peft_perft import PerftConfig  # noqa: E402

trainer = SFTTrainer(
    model="allenai/OLMoE-1B-7B-0924",
    train_dataset=load_dataset("trl-lib/tldr", split="train"),
    # bf16 only where the hardware has it: SFTConfig's default turns it on, which fails on a CPU.
    args=SFTConfig(output_dir="olmoe-perft-r", learning_rate=1e-5, max_length=256, bf16=torch.cuda.is_available()),
    peft_config=PerftConfig(variant="R", r=8, lora_alpha=16, lora_dropout=0.05, num_experts=8, top_k=2),
)
trainer.train()
trainer.save_model()  # writes only the adapter: adapter_model.safetensors + adapter_config.json
