"""PERFT on a tiny randomly initialised OLMoE: apply, train a few steps, save, reload. Runs offline in seconds.

python examples/tiny_olmoe.py --variant E
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import OlmoeConfig, OlmoeForCausalLM

from peft_perft import PerftConfig


def tiny_olmoe() -> OlmoeForCausalLM:
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return OlmoeForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="R", choices=["R", "E", "D", "S"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    model = get_peft_model(tiny_olmoe(), PerftConfig(variant=args.variant, r=8, lora_alpha=16))
    model.print_trainable_parameters()
    batch = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(args.steps):
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            perft_aux = getattr(outputs, "perft_aux_loss", None)
            extra = f"  perft_aux_loss {perft_aux.item():.4f}" if perft_aux is not None else ""
            print(f"step {step:2d}  loss {outputs.loss.item():.4f}{extra}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(tiny_olmoe(), folder)
        same = torch.equal(reloaded(batch).logits, model(batch).logits)
    print(f"saved and reloaded PERFT-{args.variant}: logits identical = {same}")


if __name__ == "__main__":
    main()
