"""What ``peft-perft demo`` checks before it loads the model: its flags, the model and data it names, and that the
data fits the model's tokenizer and context.

The flags and names are checked first (`validate_demo_args`), so a mistake costs a second, not a data build and a
base-model evaluation. The data check (`check_data_fits`) runs once the tokenizer and data are loaded: text the
tokenizer would turn into unknown tokens is refused, and sequences longer than the model's context are cut to it
with a message that says how many.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from peft_perft.cli.inputs import InputError, require_dataset, require_model, require_moe_model, require_positive
from peft_perft.config import PerftConfig
from peft_perft.context import context_length, prompts_past_the_context
from peft_perft.evaluation import get_task
from peft_perft.workflow import BUNDLED_DATASET

from .output import require_usable_output_dir
from .settings import DemoSettings

SHOWN_CHARACTERS = 12


def validate_demo_args(args: DemoSettings) -> PerftConfig:
    """Check every flag and the model and data names; return the adapter configuration the flags describe."""
    for flag in ("steps", "batch_size", "r", "max_eval_samples", "max_length"):
        require_positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
    require_positive(args.lora_alpha, "--lora-alpha")
    require_positive(args.learning_rate, "--learning-rate")
    for flag in ("num_experts", "top_k", "max_new_tokens", "threads"):
        require_positive(getattr(args, flag), f"--{flag.replace('_', '-')}", allow_none=True)
    variant = _variant_defaults(args.variant)
    if variant.follows_base_routing and args.num_experts is not None:
        raise InputError(
            f"--num-experts {args.num_experts} does not apply to --variant E: PERFT-E gives every base expert its own "
            f"adapter expert, so it always has the model's expert count. Drop --num-experts (or use --variant R)."
        )
    if not variant.has_own_router and args.top_k is not None:
        raise InputError(
            f"--top-k {args.top_k} applies only to --variant R (its own router picks top-k adapter experts); "
            f"PERFT-{args.variant} does not route. Drop --top-k."
        )
    if args.eval_task is not None:
        try:
            get_task(args.eval_task)
        except ValueError as error:
            raise InputError(f"--eval-task: {error}") from None
    require_model(args.model)
    require_dataset(args.dataset, builtin=(BUNDLED_DATASET,))
    require_moe_model(args.model)
    require_usable_output_dir(Path(args.output_dir), args.overwrite)
    require_report_backends(args.report_to)
    try:
        return PerftConfig(
            variant=args.variant, r=args.r, lora_alpha=args.lora_alpha, num_experts=args.num_experts, top_k=args.top_k
        )
    except ValueError as error:
        raise InputError(f"The adapter flags do not fit together: {error}") from None


def _variant_defaults(variant: str) -> PerftConfig:
    """The variant with default sizes: its properties say which of the size flags apply to it."""
    try:
        return PerftConfig(variant=variant)
    except ValueError as error:
        raise InputError(f"--variant: {error}") from None


def require_report_backends(report_to: str) -> None:
    """Each ``--report-to`` backend is one the Trainer knows and whose package is installed: found now, not after
    the base model's evaluation, where the Trainer would fail."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    for backend in (name.strip() for name in report_to.split(",")):
        if backend in ("none", "all") or backend in available:
            continue
        if backend not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise InputError(f"--report-to {backend} is not a logging backend the Trainer knows; choose from {known}.")
        raise InputError(
            f"--report-to {backend}: the {backend} package is not installed. Install it (pip install {backend}), or "
            f"drop --report-to."
        )


def texts_to_check(train: Dataset, test: Dataset) -> dict[str, list[str]]:
    """What the tokenizer must represent: prompt + completion of each training record, and the held-out prompts."""
    return {"train": [row["prompt"] + row["completion"] for row in train], "test": list(test["prompt"])}


def check_data_fits(
    texts_by_split: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    model_config: PretrainedConfig,
    args: DemoSettings,
    max_new_tokens: int,
    log: Callable[[str], object] = print,
) -> int:
    """Refuse text the tokenizer cannot represent; return the training length, cut to the model's context.

    ``texts_by_split`` holds prompt + completion per record (``train``) and the prompts alone (``test``).
    """
    _refuse_unknown_characters(texts_by_split, tokenizer, args)
    context = context_length(model_config)
    max_length = args.max_length if context is None else min(args.max_length, context)
    train_lengths = _lengths(texts_by_split["train"], tokenizer)
    cut = sum(length > max_length for length in train_lengths)
    if cut:
        limit = "the model's context" if max_length == context else "--max-length"
        log(
            f"[demo] {cut} of {len(train_lengths)} training examples are longer than {max_length} tokens ({limit}); "
            f"they are cut to {max_length} tokens for training."
        )
    overflow = prompts_past_the_context(model_config, _lengths(texts_by_split["test"], tokenizer), max_new_tokens)
    if overflow is not None:
        raise InputError(
            f"--dataset {args.dataset}: {len(overflow.too_long)} held-out prompts plus {max_new_tokens} generated "
            f"tokens (--max-new-tokens) exceed the context of {args.model} ({overflow.context} positions; longest "
            f"prompt {overflow.longest} tokens). Use shorter records, a smaller --max-new-tokens, or a model with a "
            f"longer context."
        )
    return max_length


def _refuse_unknown_characters(
    texts_by_split: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, args: DemoSettings
) -> None:
    """Text whose characters the tokenizer maps to its unknown token would train and score on garbage."""
    if tokenizer.unk_token_id is None:
        return  # byte-level tokenizers represent any text
    characters = {character for texts in texts_by_split.values() for text in texts for character in text}
    unknown = {
        character
        for character in characters
        if tokenizer.unk_token_id in tokenizer(character, add_special_tokens=False)["input_ids"]
    }
    if not unknown:
        return
    affected = {
        split: [index for index, text in enumerate(texts) if unknown.intersection(text)]
        for split, texts in texts_by_split.items()
    }
    split, indices = next((split, indices) for split, indices in affected.items() if indices)
    shown = "".join(sorted(unknown)[:SHOWN_CHARACTERS]) + ("..." if len(unknown) > SHOWN_CHARACTERS else "")
    total = sum(len(texts) for texts in texts_by_split.values())
    raise InputError(
        f"--dataset {args.dataset}: {sum(map(len, affected.values()))} of {total} records contain characters the "
        f"tokenizer of {args.model} cannot represent ({shown!r}; first in record {indices[0]} of the {split} split); "
        f"the demo would train and score on unknown tokens. Use a --model whose tokenizer covers this data, or "
        f"remove those characters."
    )


def _lengths(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    texts = list(texts)
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
