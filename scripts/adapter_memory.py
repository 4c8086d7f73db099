"""Per-rank memory of each PERFT variant's adapter at DeepSeek-V3 and Qwen3-235B-A22B scale, replicated vs sharded
under expert parallelism; prints the Markdown table of docs/big_models.md.

    python scripts/adapter_memory.py [--rank 8] [--routed-experts 8] [--dense-experts 4] [--ep 8 64]
                                     [--selected-shares 0.25 0.1]

Training memory per adapter parameter: fp32 weight, fp32 gradient and Adam's two fp32 moments (16 bytes). PERFT-E
is sharded over EP with ``DistributedConfig(ep_implementation="perft")`` (each rank holds the adapter experts of
its local base experts); R, D and S stay replicated. For scale, the last column is one rank's share of the frozen
routed experts in bf16 under the same EP degree. The shapes are those of the models' published config.json files.

Selective PERFT-E rows ("E sel.") assume a share of each block's experts is selected; the share is an input, not a
measurement (``peft_perft.selection`` measures it on your data). Under EP they give a range: the selected experts
spread evenly over the ranks, and the busiest rank holding as many as fit among its local experts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from peft_perft.config import PerftConfig

BYTES_PER_TRAINED_PARAMETER = 4 + 4 + 8  # fp32 weight, gradient, Adam exp_avg and exp_avg_sq
BASE_EXPERT_BYTES = 2  # bf16
GIB = 2**30


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden_size: int
    moe_layers: int
    routed_experts: int
    expert_width: int  # moe_intermediate_size

    def base_expert_parameters(self) -> int:
        """gate, up and down projections of every routed expert of every MoE layer."""
        return 3 * self.hidden_size * self.expert_width * self.routed_experts * self.moe_layers


MODELS = (
    # deepseek-ai/DeepSeek-V3: 61 layers, the first 3 dense (first_k_dense_replace), 256 routed experts of width 2048.
    MoeShape("DeepSeek-V3", hidden_size=7168, moe_layers=61 - 3, routed_experts=256, expert_width=2048),
    # Qwen/Qwen3-235B-A22B: 94 layers, all MoE, 128 experts of width 1536.
    MoeShape("Qwen3-235B-A22B", hidden_size=4096, moe_layers=94, routed_experts=128, expert_width=1536),
)


def perft_config(variant: str, rank: int, routed: int, dense: int) -> PerftConfig:
    """The adapter a row describes: ``routed`` experts for R, ``dense`` for D (E and S fix their own count)."""
    return PerftConfig(variant=variant, r=rank, num_experts={"R": routed, "D": dense}.get(variant))


def adapter_parameters(shape: MoeShape, variant: str, rank: int, routed: int, dense: int) -> int:
    """PERFT parameters over all MoE layers, by the formula on `PerftConfig`."""
    config = perft_config(variant, rank, routed, dense)
    return config.trainable_parameters_per_block(shape.hidden_size, shape.routed_experts) * shape.moe_layers


def selected_experts(shape: MoeShape, share: float) -> int:
    """Selected experts per block for a share of the block's experts (at least one)."""
    return max(1, round(share * shape.routed_experts))


def selective_bytes_per_rank(shape: MoeShape, rank: int, share: float, ep: int) -> tuple[float, int]:
    """Training bytes of selective PERFT-E on one of ``ep`` ranks: with the selected experts spread evenly, and on
    the busiest rank (all its local experts selected, up to the selected count)."""
    selected = selected_experts(shape, share)
    per_expert = 2 * rank * shape.hidden_size * shape.moe_layers * BYTES_PER_TRAINED_PARAMETER
    return selected * per_expert / ep, min(selected, shape.routed_experts // ep) * per_expert


def selective_row(shape: MoeShape, rank: int, share: float, ep_degrees: list[int]) -> list[str]:
    """Selective PERFT-E with ``share`` of every block's experts: replicated, then per EP degree the per-rank range
    of `selective_bytes_per_rank`."""
    selected = selected_experts(shape, share)
    parameters = selected * 2 * rank * shape.hidden_size * shape.moe_layers
    row = [shape.name, f"E sel. ({share:.0%}: {selected} experts, arithmetic)", f"{parameters / 1e6:,.1f}M"]
    row.append(f"{parameters * BYTES_PER_TRAINED_PARAMETER / GIB:,.2f}")
    for ep in ep_degrees:
        even, busiest = selective_bytes_per_rank(shape, rank, share, ep)
        base_share = shape.base_expert_parameters() * BASE_EXPERT_BYTES / ep / GIB
        row.append(f"{even / GIB:,.2f} to {busiest / GIB:,.2f} (base {base_share:,.1f})")
    return row


def rows(rank: int, routed: int, dense: int, ep_degrees: list[int], shares: tuple[float, ...] = ()) -> list[list[str]]:
    table = []
    for shape in MODELS:
        for variant in ("R", "E", "D", "S"):
            parameters = adapter_parameters(shape, variant, rank, routed, dense)
            # Under EP with ep_implementation="perft" only the adapter that follows the base routing is sharded.
            sharded_over_ep = perft_config(variant, rank, routed, dense).follows_base_routing
            replicated = parameters * BYTES_PER_TRAINED_PARAMETER / GIB
            row = [shape.name, _variant_label(variant, routed, dense, shape), f"{parameters / 1e6:,.1f}M"]
            row.append(f"{replicated:,.2f}")
            for ep in ep_degrees:
                sharded = replicated / ep if sharded_over_ep else replicated
                base_share = shape.base_expert_parameters() * BASE_EXPERT_BYTES / ep / GIB
                row.append(f"{sharded:,.2f} (base {base_share:,.1f})")
            table.append(row)
            if variant == "E":
                table += [selective_row(shape, rank, share, ep_degrees) for share in shares]
    return table


def _variant_label(variant: str, routed: int, dense: int, shape: MoeShape) -> str:
    experts = perft_config(variant, 1, routed, dense).resolved_num_experts(shape.routed_experts)
    return f"{variant} ({experts} expert{'s' if experts > 1 else ''})"


def markdown(rank: int, routed: int, dense: int, ep_degrees: list[int], shares: tuple[float, ...] = ()) -> str:
    header = ["model", "variant", "adapter parameters", "replicated GiB/rank"]
    header += [f"EP={ep}: GiB/rank (frozen experts bf16)" for ep in ep_degrees]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(rank, routed, dense, ep_degrees, shares)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r")
    parser.add_argument("--routed-experts", type=int, default=8, help="PERFT-R adapter experts per block")
    parser.add_argument("--dense-experts", type=int, default=4, help="PERFT-D adapter experts per block")
    parser.add_argument("--ep", type=int, nargs="+", default=[8, 64], help="expert-parallel degrees")
    parser.add_argument(
        "--selected-shares",
        type=float,
        nargs="*",
        default=[0.25, 0.1],
        help="shares of each block's experts for the selective PERFT-E rows (assumed, not measured)",
    )
    args = parser.parse_args()
    print(markdown(args.rank, args.routed_experts, args.dense_experts, args.ep, tuple(args.selected_shares)))


if __name__ == "__main__":
    main()
