"""PERFT-R on OLMoE with TRL's SFTTrainer: the lines to copy. Real runs: examples/sft_perft.py."""

from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

from peft_perft import PerftConfig  # importing peft_perft registers PERFT with peft

trainer = SFTTrainer(
    model="allenai/OLMoE-1B-7B-0924",
    train_dataset=load_dataset("trl-lib/tldr", split="train"),
    args=SFTConfig(output_dir="olmoe-perft-r", learning_rate=1e-5, max_length=256),
    peft_config=PerftConfig(variant="R", r=8, lora_alpha=16, lora_dropout=0.05, num_experts=8, top_k=2),
)
trainer.train()
trainer.save_model()  # writes only the adapter: adapter_model.safetensors + adapter_config.json
