"""How many experts selective PERFT-E adapts on the bundled model and task: per routing-mass target, the experts
`peft_perft.selection.select_experts` picks in each MoE block; prints the Markdown table of docs/variants.md.

    python scripts/selected_share.py [--examples 512] [--masses 0.5 0.8 0.9] [--rank 8]

The bundled model is a 4-layer OLMoE with 8 experts per block and top-2 routing; the share of experts a routing
mass needs depends on the model's expert count, its top-k and the data, so these figures describe this model only.
"""

from __future__ import annotations

import argparse

import torch

from peft_perft.demo import BUNDLED_MODEL_DIR, bundled_task, load_base_model, load_tokenizer
from peft_perft.selection import select_experts


def table(examples: int, masses: list[float], rank: int) -> str:
    model_dir = str(BUNDLED_MODEL_DIR)
    model = load_base_model(model_dir, torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    train = bundled_task(examples, 4, seed=0).train.select_columns(["prompt", "completion"])
    hidden = model.config.hidden_size
    lines = [
        "| routing mass | experts per block (of 8) | experts adapted | adapter parameters at r=" + f"{rank} |",
        "|---|---|---|---|",
    ]
    for mass in masses:
        selection = select_experts(model, train, mass=mass, tokenizer=tokenizer, description=f"{examples} examples")
        counts = [len(experts) for experts in selection.experts.values()]
        total = sum(len(load) for load in selection.loads.values())
        parameters = sum(counts) * 2 * rank * hidden
        lines.append(f"| {mass:.0%} | {counts} | {sum(counts)} of {total} | {parameters:,} |")
    lines.append(f"| full PERFT-E | {[8] * len(counts)} | {total} of {total} | {total * 2 * rank * hidden:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512, help="training examples of the bundled task measured")
    parser.add_argument("--masses", type=float, nargs="+", default=[0.5, 0.8, 0.9], help="routing-mass targets")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r for the parameter column")
    args = parser.parse_args()
    print(table(args.examples, args.masses, args.rank))


if __name__ == "__main__":
    main()
