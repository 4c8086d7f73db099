"""Pretrain the small OLMoE bundled with peft-perft for ``peft-perft demo``.

Rerun with ``python scripts/train_demo_model.py`` (about four minutes on one CPU thread). It builds a
character-level tokenizer, pretrains a tiny ``OlmoeForCausalLM`` from scratch on the generic-skills
mixture of ``peft_perft.demo.data`` (copy, reverse, upper-case), and writes config, safetensors weights,
tokenizer files and a metadata file into ``peft_perft/demo/assets/demo-olmoe``. The demo's fine-tuning task is
never shown to this model; the script prints the base model's accuracy on it to prove that.

Bit-for-bit reproduction needs the same seed and thread count, the same torch, transformers and tokenizers versions
(``training_metadata.json`` records them, with the CPU) and the same kind of CPU: float kernels differ between CPU
models. ``--compare-with DIR`` rebuilds and reports whether the weights equal those in DIR, bit for bit or how far
apart, e.g. ``python scripts/train_demo_model.py --output-dir /tmp/rebuilt --compare-with
peft_perft/demo/assets/demo-olmoe``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from peft_perft.demo.data import CHARACTERS, DEMO_TASKS, PRETRAINING_TASKS, demo_task_splits, pretraining_dataset

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "peft_perft" / "demo" / "assets" / "demo-olmoe"
SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}
IGNORED_LABEL = -100


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of the demo alphabet, plus padding, end-of-sequence and unknown tokens."""
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for character in CHARACTERS:
        vocabulary[character] = len(vocabulary)
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="left",
    )


def build_model_config(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> OlmoeConfig:
    """A miniature OLMoE: same architecture as allenai/OLMoE-1B-7B, sized to train in minutes on a CPU."""
    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
    )


def encode_all(
    prompts: list[str], completions: list[str], tokenizer: PreTrainedTokenizerFast
) -> list[tuple[list[int], list[int]]]:
    """Token ids of prompt + completion + eos, and labels that score only the completion and eos."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completions, add_special_tokens=False).input_ids
    return [
        (
            prompt + completion + [tokenizer.eos_token_id],
            [IGNORED_LABEL] * len(prompt) + completion + [tokenizer.eos_token_id],
        )
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True)
    ]


def collate(encoded: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for teacher-forced training."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id)
    labels = torch.full((len(encoded), width), IGNORED_LABEL)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> list[float]:
    """Plain teacher-forced training on the generic mixture; returns the loss every 100 steps."""
    examples = pretraining_dataset(args.steps * args.batch_size, seed=args.seed)
    encoded = encode_all(list(examples["prompt"]), list(examples["completion"]), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    order = list(range(len(encoded)))
    random.Random(args.seed).shuffle(order)
    losses: list[float] = []
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.steps, args.learning_rate, warmup_steps=args.steps // 20)
        batch_rows = order[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(**collate([encoded[i] for i in batch_rows], tokenizer.pad_token_id)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            losses.append(round(loss.item(), 4))
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]
) -> dict[str, float]:
    """Exact-match accuracy of greedy generation, per task name."""
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    generated = model.generate(
        **batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, output_router_logits=False
    )
    answers = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    hits: dict[str, list[bool]] = {}
    for row, answer in zip(rows, answers, strict=True):
        hits.setdefault(row["task"], []).append(answer == row["completion"])
    return {task: sum(values) / len(values) for task, values in hits.items()}


def fresh_pretraining_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Newly drawn generic-mixture examples (another seed) to check the skills were learnt, not memorised.

    Long strings are new with near certainty; short two-letter ones necessarily repeat training examples.
    """
    return list(pretraining_dataset(count, seed=seed + 1_000_003))


def write_assets(model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, output_dir: Path, metadata: dict) -> None:
    """Save weights as safetensors, the tokenizer, and a metadata file saying how they were made."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def command_line_flags(args: argparse.Namespace) -> str:
    """The flags that reproduce this run (the output folder aside)."""
    skipped = {"output_dir", "compare_with"}
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key not in skipped)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; results can differ across counts")
    parser.add_argument("--compare-with", type=Path, default=None, help="a model folder to compare the weights with")
    return parser.parse_args()


def cpu_name() -> str:
    """The CPU model (float kernels, hence the exact weights, depend on it)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def compare_weights(built: Path, reference: Path) -> str:
    """Whether two model.safetensors files hold identical tensors, else the largest difference."""
    new, old = load_file(built / "model.safetensors"), load_file(reference / "model.safetensors")
    if new.keys() != old.keys():
        return f"different tensors: {sorted(new.keys() ^ old.keys())}"
    differences = {name: (new[name].float() - old[name].float()).abs().max().item() for name in new}
    if not any(differences.values()):
        return f"identical: every tensor of {built} equals {reference} bit for bit"
    worst = max(differences, key=differences.get)
    differing = sum(1 for value in differences.values() if value)
    return f"NOT identical: {differing} of {len(new)} tensors differ, the most {worst} by {differences[worst]:.3g}"


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = OlmoeForCausalLM(build_model_config(tokenizer, args))
    print(f"parameters: {model.num_parameters():,}", flush=True)
    losses = pretrain(model, tokenizer, args)
    train_seconds = time.perf_counter() - started
    generic = greedy_accuracy(model, tokenizer, fresh_pretraining_rows(70 * len(PRETRAINING_TASKS), args.seed))
    demo = greedy_accuracy(model, tokenizer, list(demo_task_splits(num_train=0, num_test=200, seed=0)["test"]))
    print("accuracy on fresh examples of the pretraining skills:", json.dumps(generic))
    print("accuracy on the demo task it never saw:", json.dumps(demo))
    metadata = {
        "made_by": "python scripts/train_demo_model.py " + command_line_flags(args),
        "pretraining_tasks": sorted({f"{task.name} ({task.alphabet[:3]}...)" for task in PRETRAINING_TASKS}),
        "demo_tasks_never_seen": [task.name for task in DEMO_TASKS],
        "pretraining_examples": args.steps * args.batch_size,
        "loss_every_100_steps": losses,
        "pretraining_skills_accuracy_on_fresh_examples": generic,
        "demo_task_accuracy_before_fine_tuning": demo,
        "seconds_to_generate_data_and_train": round(train_seconds, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
            "cpu": cpu_name(),
        },
    }
    write_assets(model, tokenizer, args.output_dir, metadata)
    print(f"wrote {args.output_dir} in {time.perf_counter() - started:.0f} s")
    if args.compare_with is not None:
        print(compare_weights(args.output_dir, args.compare_with))


if __name__ == "__main__":
    main()
