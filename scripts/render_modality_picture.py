"""Draw the routing-by-modality picture at Qwen3-VL-30B-A3B's shape (48 MoE layers, 128 experts, top-8), from
synthetic counts, to check that it stays readable at that size.

    python scripts/render_modality_picture.py --output docs/images/modality_qwen3_vl_moe.png

The counts are made up (no 30B model runs here): text tokens spread over all experts, image tokens lean on a group
of experts that grows with depth, so the overlap falls from the first layers to the last. On a real model the same
picture comes from ``modality_load(routing_trace(model, batch), {config.image_token_id: "image"})``, as
``tests/test_modality_routing.py`` does on a tiny Qwen3-VL-MoE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from peft_perft.monitor import ModalityLoad, draw_modality_load

LAYERS, EXPERTS, TOP_K = 48, 128, 8
TOKENS = {"text": 2048, "image": 1024}
VISION_EXPERTS = 32


def synthetic_load(seed: int = 0) -> ModalityLoad:
    """Per layer, each token draws TOP_K distinct experts from its modality's expert distribution."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(TOKENS), LAYERS, EXPERTS)
    for layer in range(LAYERS):
        logits = torch.randn(EXPERTS, generator=generator) * 0.6
        for index, (modality, tokens) in enumerate(TOKENS.items()):
            preference = logits.clone()
            if modality == "image":
                preference[:VISION_EXPERTS] += 3.0 * layer / (LAYERS - 1)
            probabilities = torch.softmax(preference, dim=0).expand(tokens, EXPERTS)
            chosen = torch.multinomial(probabilities, TOP_K, replacement=False, generator=generator)
            counts[index, layer] = torch.bincount(chosen.flatten(), minlength=EXPERTS).float()
    return ModalityLoad(tuple(TOKENS), tuple(range(LAYERS)), counts, TOP_K)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("modality_qwen3_vl_moe.png"))
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    caption = (
        f"SYNTHETIC counts at Qwen3-VL-30B-A3B's shape ({LAYERS} layers, {EXPERTS} experts, top-{TOP_K}): "
        f"{TOKENS['image']} image and {TOKENS['text']} text tokens per layer; image tokens favour experts "
        f"0-{VISION_EXPERTS - 1} more with depth."
    )
    path = draw_modality_load(synthetic_load(), args.output, "Expert load by modality (image rows, then text)", caption)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
