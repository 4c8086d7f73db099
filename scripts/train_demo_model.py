"""Pretrain the small OLMoE bundled with peft-perft for ``peft-perft demo``.

Rerun with ``python scripts/train_demo_model.py`` (about four minutes on one idle CPU thread). It builds a
character-level tokenizer, pretrains a tiny ``OlmoeForCausalLM`` from scratch on the generic-skills
mixture of ``peft_perft.workflow.bundled_tasks`` (copy, reverse, upper-case), and writes config, safetensors weights,
tokenizer files and a metadata file into ``peft_perft/demo/assets/demo-olmoe``. The demo's fine-tuning task is
never shown to this model; the script prints the base model's accuracy on it to prove that.

Bit-for-bit reproduction needs the same seed and thread count and the same torch and transformers versions
(``training_metadata.json`` records them). Float kernels also differ between CPUs: torch and MKL pick AVX-512 code
on one CPU and AVX2 code on another, and sum in different orders. The script therefore pins them before torch
loads: ATen to its AVX2 kernels, oneDNN to AVX2 at most, and MKL to its ``COMPATIBLE`` reproducibility branch, the
only one Intel documents as giving the same results on Intel and non-Intel CPUs (on an AMD CPU, ``MKL_CBWR=AVX2``
falls back to MKL's own CPU-dependent choice; that is why weights made on an AMD EPYC did not rebuild on an Intel
Xeon).

``--check-reproduction`` reruns the first steps of the recorded command (seconds) and compares the weights with the
record: bit for bit by SHA-256, else each tensor's change over those steps within a tolerance that float rounding
on another CPU stays far inside and any change of the recipe (seed, learning rate, data, steps) exceeds;
``--record-reproduction`` writes that record. ``--compare-with DIR`` rebuilds in full and reports whether the
weights equal those in DIR, bit for bit or how far apart, e.g. ``python scripts/train_demo_model.py --output-dir
/tmp/rebuilt --compare-with peft_perft/demo/assets/demo-olmoe``.
"""

from __future__ import annotations

import os

# Before torch loads: the same (AVX2) ATen kernels on every x86-64 CPU, and MKL's vendor-independent reproducible mode.
PINNED_CPU_CODE_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
os.environ.update(PINNED_CPU_CODE_PATHS)

import argparse
import hashlib
import json
import math
import platform
import random
import time
import zlib
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from peft_perft.workflow.bundled_tasks import (
    CHARACTERS,
    DEMO_TASKS,
    PRETRAINING_TASKS,
    demo_task_splits,
    pretraining_dataset,
)

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "peft_perft" / "demo" / "assets" / "demo-olmoe"
SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}
IGNORED_LABEL = -100
FINGERPRINT_STEPS = 20
# How far (relative to each tensor's change over the first steps) a rebuild may land from the record and still count
# as reproduced. Measured on one Intel Xeon: other kernels (AVX-512, MKL branches) and two threads moved the weights
# by at most 1e-5 of that change; a 1% higher learning rate by 9e-3 to 9e-2, one step fewer by 0.08 to 0.12, another
# seed by 0.7 to 11.
UPDATE_TOLERANCE = 1e-3


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


def weights_fingerprint(named_tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes, in name order: equal only if the weights are equal bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def update_statistics(start: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor, the norm of its change since ``start`` and that change's projection on a fixed random sign
    pattern: two numbers that float rounding moves by about its own size and any other training moves by far more."""
    statistics = {}
    for name in sorted(now):
        change = now[name].detach().double() - start[name].double()
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        signs = torch.randint(0, 2, change.shape, generator=generator).double() * 2 - 1
        statistics[name] = [change.norm().item(), (change * signs).sum().item()]
    return statistics


def update_deviations(here: dict[str, list[float]], recorded: dict[str, list[float]]) -> dict[str, float]:
    """Per tensor, how far the statistics here are from the recorded ones, relative to the recorded change's norm."""
    if here.keys() != recorded.keys():
        return {name: math.inf for name in here.keys() ^ recorded.keys()}
    return {
        name: max(abs(a - b) for a, b in zip(here[name], recorded[name], strict=True)) / recorded[name][0]
        for name in recorded
    }


def pretrain(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace, stop_after: int | None = None
) -> tuple[list[float], dict]:
    """Plain teacher-forced training on the generic mixture.

    Returns the loss every 100 steps and the reproduction record after ``FINGERPRINT_STEPS`` steps (fingerprint and
    per-tensor change statistics); with ``stop_after`` it stops there (same data and schedule as the full run, so
    the record is comparable).
    """
    examples = pretraining_dataset(args.steps * args.batch_size, seed=args.seed)
    encoded = encode_all(list(examples["prompt"]), list(examples["completion"]), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    order = list(range(len(encoded)))
    random.Random(args.seed).shuffle(order)
    losses: list[float] = []
    record: dict = {}
    start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    model.train()
    for step in range(args.steps if stop_after is None else stop_after):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.steps, args.learning_rate, warmup_steps=args.steps // 20)
        batch_rows = order[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(**collate([encoded[i] for i in batch_rows], tokenizer.pad_token_id)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step + 1 == FINGERPRINT_STEPS:
            record = {
                "steps": FINGERPRINT_STEPS,
                "weights_sha256": weights_fingerprint(model.state_dict()),
                "update_statistics": update_statistics(start, model.state_dict()),
                "versions": software_versions(),
            }
        if step % 100 == 0 or step == args.steps - 1:
            losses.append(round(loss.item(), 4))
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses, record


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
    """Save weights as safetensors, the tokenizer, and a metadata file saying how they were made, with the SHA-256
    of the tensors as saved (Transformers may store them in another layout than the model holds them)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    metadata["weights_sha256_after_steps"]["final"] = weights_fingerprint(load_file(output_dir / "model.safetensors"))
    (output_dir / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def command_line_flags(args: argparse.Namespace) -> str:
    """The flags that reproduce this run (the output folder aside)."""
    skipped = {"output_dir", "compare_with", "check_reproduction", "record_reproduction"}
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key not in skipped)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--check-reproduction",
        action="store_true",
        help=f"rerun the first {FINGERPRINT_STEPS} steps of the command recorded in --compare-with (default: the "
        "bundled model) and compare the weights with the recorded ones (bit for bit, else within float rounding); "
        "exit 1 if they differ by more",
    )
    parser.add_argument(
        "--record-reproduction",
        action="store_true",
        help=f"rerun the first {FINGERPRINT_STEPS} steps of the recorded command and write what --check-reproduction "
        "compares with into its training_metadata.json",
    )
    return parser.parse_args(argv)


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


def software_versions() -> dict[str, str]:
    """What the exact weights depend on besides the command: library versions, CPU and pinned code paths."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_code_paths": ", ".join(f"{key}={value}" for key, value in PINNED_CPU_CODE_PATHS.items()),
    }


def fresh_model(args: argparse.Namespace) -> tuple[PreTrainedTokenizerFast, OlmoeForCausalLM]:
    """Seed, thread count, tokenizer and the randomly initialised model: everything the first step depends on."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    return tokenizer, OlmoeForCausalLM(build_model_config(tokenizer, args))


def rerun_first_steps(reference_dir: Path) -> dict:
    """The reproduction record of the first steps of the command recorded in ``reference_dir``, computed here."""
    metadata = json.loads((reference_dir / "training_metadata.json").read_text())
    args = parse_args(metadata["made_by"].split()[2:])
    tokenizer, model = fresh_model(args)
    return pretrain(model, tokenizer, args, stop_after=FINGERPRINT_STEPS)[1]


def record_reproduction(reference_dir: Path) -> int:
    """Store this machine's record of the first steps beside the recorded command."""
    path = reference_dir / "training_metadata.json"
    metadata = json.loads(path.read_text())
    metadata["reproduction_check"] = rerun_first_steps(reference_dir)
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"recorded the first {FINGERPRINT_STEPS} steps' weights in {path}")
    return 0


def check_reproduction(reference_dir: Path) -> int:
    """Rerun the first steps of the recorded command; 0 if the weights equal the recorded ones bit for bit or
    within float rounding (each tensor's change within UPDATE_TOLERANCE of the recorded one), else 1."""
    recorded = json.loads((reference_dir / "training_metadata.json").read_text())["reproduction_check"]
    here = rerun_first_steps(reference_dir)
    print("versions here:    ", json.dumps(here["versions"]))
    print("versions recorded:", json.dumps(recorded["versions"]))
    differing = sorted(
        key
        for key in here["versions"].keys() & recorded["versions"].keys()
        if here["versions"][key] != recorded["versions"][key]
    )
    differences = f"; these differ from the recorded run: {', '.join(differing)}" if differing else ""
    if here["weights_sha256"] == recorded["weights_sha256"]:
        print(
            f"reproduced bit for bit: after {FINGERPRINT_STEPS} steps the weights equal the recorded ones{differences}"
        )
        return 0
    deviations = update_deviations(here["update_statistics"], recorded["update_statistics"])
    worst = max(deviations, key=deviations.get)
    measured = f"{worst} by {deviations[worst]:.2g} of its change (tolerance {UPDATE_TOLERANCE:g})"
    if deviations[worst] <= UPDATE_TOLERANCE:
        print(
            f"reproduced within float rounding: after {FINGERPRINT_STEPS} steps the weights are not equal bit for bit "
            f"but every tensor's change matches the recorded one, the farthest {measured}{differences}"
        )
        return 0
    print(
        f"NOT reproduced: after {FINGERPRINT_STEPS} steps the weights differ from the recorded ones by more than float "
        f"rounding, the farthest {measured}{differences}"
    )
    return 1


def main() -> int:
    args = parse_args()
    if args.check_reproduction:
        return check_reproduction(args.compare_with or DEFAULT_OUTPUT_DIR)
    if args.record_reproduction:
        return record_reproduction(args.compare_with or DEFAULT_OUTPUT_DIR)
    started = time.perf_counter()
    tokenizer, model = fresh_model(args)
    print(f"parameters: {model.num_parameters():,}", flush=True)
    losses, reproduction = pretrain(model, tokenizer, args)
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
        "weights_sha256_after_steps": {str(FINGERPRINT_STEPS): reproduction["weights_sha256"]},
        "pretraining_skills_accuracy_on_fresh_examples": generic,
        "demo_task_accuracy_before_fine_tuning": demo,
        "seconds_to_generate_data_and_train": round(train_seconds, 1),
        "versions": software_versions(),
        "reproduction_check": reproduction,
    }
    write_assets(model, tokenizer, args.output_dir, metadata)
    print(f"wrote {args.output_dir} in {time.perf_counter() - started:.0f} s")
    if args.compare_with is not None:
        print(compare_weights(args.output_dir, args.compare_with))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
