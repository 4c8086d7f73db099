"""Train a PERFT adapter on an image-text MoE model (Qwen3-VL-MoE) with TRL's SFTTrainer, then reload it exactly.

The collator is written out here (image pixels through the model's own image processor, the image placeholder
tokens, prompt and answer tokens, loss on the answer only), so the same code runs on a tiny model built from a
config and on a real checkpoint's processor. ``--tiny`` builds a tiny Qwen3-VL-MoE, a character tokenizer and a few
random images locally (no download, CPU, seconds):

    python examples/vlm_perft.py --tiny --output_dir runs/vlm-tiny

On a real checkpoint (recipe in docs/training.md, not run in this repository's CI):

    python examples/vlm_perft.py --model_name_or_path Qwen/Qwen3-VL-30B-A3B-Instruct --output_dir runs/vlm
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from trl import SFTConfig, SFTTrainer

from peft_perft import PerftConfig

TINY_CHARACTERS = "abcdefghijklmnopqrstuvwxyz ?.:"
TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<image>", "<vision_start>", "<vision_end>")
TINY_IMAGE_SIDE = 32
"""Tiny images are 32 x 32 pixels: 2 x 2 patches of 16 pixels, merged 2 x 2 into one image token."""
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@dataclass(frozen=True)
class ImageTokens:
    """The token ids that frame and stand for an image in the model's input (from the model's config)."""

    image: int
    start: int
    end: int


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus pad/eos/bos and the three image tokens (no Hub needed)."""
    vocabulary = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS)}
    vocabulary.update({c: len(TINY_SPECIAL_TOKENS) + i for i, c in enumerate(TINY_CHARACTERS)})
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_qwen3_vl_moe(seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    """Qwen3-VL-MoE in miniature: a 2-layer language model with 4 experts (top-2), a 1-layer vision tower."""
    text = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                            "mrope_interleaved": True},
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }  # fmt: skip
    vision = {
        "depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
        "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }  # fmt: skip
    config = Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=3, vision_start_token_id=4, vision_end_token_id=5
    )
    torch.manual_seed(seed)
    return Qwen3VLMoeForConditionalGeneration(config)


def tiny_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processing (16-pixel patches, 2 x 2 merge) at a size that gives one image token."""
    side = TINY_IMAGE_SIDE * TINY_IMAGE_SIDE
    return Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=side, max_pixels=side
    )


def colour_examples(count: int, seed: int = 0) -> Dataset:
    """Images filled with one colour plus noise, each asked about its colour: learnable from the pixels alone."""
    generator = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        name, rgb = list(COLOURS.items())[index % len(COLOURS)]
        noise = generator.integers(-20, 20, (TINY_IMAGE_SIDE, TINY_IMAGE_SIDE, 3))
        pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
        # Not named "image": TRL would then prepare the data itself, which needs a full multimodal processor.
        rows.append({"picture": Image.fromarray(pixels), "prompt": "colour?", "completion": f" {name}."})
    return Dataset.from_list(rows)


class ImageTextCollator:
    """Batches (picture, prompt, completion) rows into the model's inputs: image placeholders, then prompt and
    completion tokens; labels cover the completion and its end token only."""

    def __init__(self, image_processor, tokenizer, image_tokens: ImageTokens):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        vision = self.image_processor(images=[row["picture"] for row in rows], return_tensors="pt")
        merge = self.image_processor.merge_size**2
        sequences, labels = [], []
        for row, grid in zip(rows, vision["image_grid_thw"], strict=True):
            image = [self.image_tokens.start] + [self.image_tokens.image] * (int(grid.prod()) // merge)
            prompt = image + [self.image_tokens.end] + self.tokenizer.encode(row["prompt"], add_special_tokens=False)
            answer = self.tokenizer.encode(row["completion"], add_special_tokens=False) + [self.tokenizer.eos_token_id]
            sequences.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(sequence) for sequence in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        return {
            "input_ids": input_ids,
            # Which tokens are image placeholders (1): multimodal RoPE gives them 2-D positions.
            "mm_token_type_ids": (input_ids == self.image_tokens.image).long(),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
            "labels": torch.tensor([s + [-100] * (width - len(s)) for s in labels]),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }


def load(args: argparse.Namespace):
    """(model, image processor, tokenizer): tiny and local with ``--tiny``, else the checkpoint and its processor."""
    if args.tiny:
        return tiny_qwen3_vl_moe(), tiny_image_processor(), tiny_tokenizer()
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype="auto")
    return model, processor.image_processor, processor.tokenizer


def image_tokens_of(model) -> ImageTokens:
    config = model.config
    return ImageTokens(config.image_token_id, config.vision_start_token_id, config.vision_end_token_id)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Build a tiny Qwen3-VL-MoE and data locally (CPU).")
    parser.add_argument("--model_name_or_path", help="An image-text MoE checkpoint (ignored with --tiny).")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--variant", default="R", choices=["R", "E", "D", "S"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--perft_num_experts", type=int, default=4, help="PERFT-R's adapter experts.")
    parser.add_argument("--perft_top_k", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--examples", type=int, default=12)
    args = parser.parse_args(argv)
    if not args.tiny and not args.model_name_or_path:
        parser.error("give --model_name_or_path (an image-text MoE checkpoint) or --tiny")
    return args


def perft_config(args: argparse.Namespace) -> PerftConfig:
    sizes = {"num_experts": args.perft_num_experts, "top_k": args.perft_top_k} if args.variant == "R" else {}
    return PerftConfig(variant=args.variant, r=args.r, lora_alpha=2 * args.r, **sizes)


def main(argv: list[str] | None = None) -> dict:
    """Train, save the adapter; with --tiny, reload it onto a fresh copy of the base model and compare the logits."""
    args = parse_args(argv)
    model, image_processor, tokenizer = load(args)
    collator = ImageTextCollator(image_processor, tokenizer, image_tokens_of(model))
    dataset = colour_examples(args.examples)
    sft_args = SFTConfig(
        output_dir=str(args.output_dir / "checkpoints"),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.tiny,
        # TRL turns bf16 autocast on by default; the tiny CPU run stays in float32 so that its reload check is exact.
        bf16=not args.tiny,
        seed=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        peft_config=perft_config(args),
    )
    trainer.train()
    adapter_dir = args.output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    batch = collator([dataset[index] for index in range(3)])
    batch.pop("labels")
    trained = trainer.model.eval()
    with torch.no_grad():
        logits = trained(**batch).logits
    report = {"first_loss": losses[0], "last_loss": losses[-1], "adapter": str(adapter_dir)}
    if args.tiny:
        reloaded = PeftModel.from_pretrained(tiny_qwen3_vl_moe(seed=0), adapter_dir).eval()
        with torch.no_grad():
            report["reload_max_abs_diff"] = (reloaded(**batch).logits - logits).abs().max().item()
        torch.save({"batch": batch, "logits": logits}, args.output_dir / "check_batch.pt")
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
