"""Draw the routing pictures at real models' shapes, with random weights, to check that they stay readable.

    python scripts/render_routing_pictures.py --output-dir routing-pictures

Builds OLMoE-1B-7B's routing shape (64 experts top-8, 16 layers) and DeepSeek-V3's (256 experts top-8, 58 MoE layers
after 3 dense ones) at a tiny hidden size, puts a PERFT-R adapter (16 experts, top-4) on each, and writes the routing
monitor's heatmaps and a routing trace of one byte-level-tokenized sentence for each into ``<output-dir>/<shape>/``.
Nothing is downloaded; the tokenizer is a byte-level BPE trained on a few sentences here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import get_peft_model
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, DeepseekV3Config, OlmoeConfig, PretrainedConfig, PreTrainedTokenizerFast

from peft_perft import PerftConfig
from peft_perft.monitor import routing_report, routing_trace

SENTENCES = [
    "Which experts handle this prompt about the Mixture-of-Experts model?",
    "PERFT adds routed adapter experts beside the frozen experts of every MoE block.",
    "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun.",
]
TRACE_PROMPT = "Which experts handle this prompt, token by token, in every layer of the model?"


def byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (tokens such as 'Ġexperts'), trained on the sentences above."""
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(SENTENCES * 20, vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, pad_token="<pad>", eos_token="<eos>")


def shapes(vocab_size: int) -> dict[str, PretrainedConfig]:
    common = {"vocab_size": vocab_size, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    return {
        "olmoe": OlmoeConfig(
            **common, intermediate_size=16, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8
        ),
        "deepseek_v3": DeepseekV3Config(
            **common,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=61,
            first_k_dense_replace=3,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    }


def render(name: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, output_dir: Path) -> list[Path]:
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config).eval(), PerftConfig(variant="R", r=4, num_experts=16, top_k=4)
    )
    directory = output_dir / name
    report = routing_report(model, SENTENCES, tokenizer=tokenizer, output_dir=directory, description="3 sentences")
    trace = routing_trace(model, TRACE_PROMPT, tokenizer=tokenizer)
    return [*report.save_heatmaps(directory), trace.plot(directory / "trace.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("routing-pictures"), help="where the PNGs go")
    args = parser.parse_args()
    tokenizer = byte_level_tokenizer(vocab_size=400)
    for name, config in shapes(len(tokenizer)).items():
        for path in render(name, config, tokenizer, args.output_dir):
            print(path)


if __name__ == "__main__":
    main()
