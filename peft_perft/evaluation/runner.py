"""Batched generation over LLM-Adapters test sets, scoring, and the reports a user audits."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from peft_perft.context import prompts_past_the_context
from peft_perft.evaluation.answers import ParsedAnswer, extract_answer, get_task, score_answer
from peft_perft.evaluation.data import build_prompt, load_task_records, resolve_tasks

DTYPES = ("auto", "float32", "bfloat16", "float16")
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
PREDICTIONS_JSONL = "predictions.jsonl"


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options; `num_beams=4` reproduces the paper, `max_new_tokens=None` keeps each task's default."""

    batch_size: int = 8
    num_beams: int = 1
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Prediction:
    """One scored generation, kept so a user can audit every mistake."""

    task: str
    index: int
    prompt: str
    generated_text: str
    parsed_answer: ParsedAnswer
    gold_answer: str
    correct: bool

    @property
    def id(self) -> str:
        return f"{self.task}/{self.index}"


@dataclass
class TaskResult:
    """All predictions of one task and its accuracy."""

    task: str
    predictions: list[Prediction]

    @property
    def correct(self) -> int:
        return sum(prediction.correct for prediction in self.predictions)

    @property
    def total(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvaluationReport:
    """Per-task results with the paper's macro average (the mean of task accuracies)."""

    results: dict[str, TaskResult]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(result.accuracy for result in self.results.values()) / len(self.results)

    def group_averages(self) -> dict[str, float]:
        """Commonsense and arithmetic means, reported only when both families were evaluated."""
        groups: dict[str, list[float]] = {}
        for task, result in self.results.items():
            groups.setdefault(get_task(task).group, []).append(result.accuracy)
        return {name: sum(values) / len(values) for name, values in groups.items()} if len(groups) > 1 else {}

    def to_dict(self) -> dict[str, Any]:
        tasks = {
            task: {"correct": result.correct, "total": result.total, "accuracy": result.accuracy}
            for task, result in self.results.items()
        }
        return {"tasks": tasks, "average": self.average, "group_averages": self.group_averages(), **self.metadata}

    def to_markdown(self) -> str:
        lines = ["| task | correct | total | accuracy (%) |", "| --- | ---: | ---: | ---: |"]
        lines += [
            f"| {task} | {result.correct} | {result.total} | {100 * result.accuracy:.2f} |"
            for task, result in self.results.items()
        ]
        lines += [f"| {group} average | | | {100 * value:.2f} |" for group, value in self.group_averages().items()]
        lines.append(f"| **average** ({len(self.results)} tasks) | | | **{100 * self.average:.2f}** |")
        return "\n".join(lines) + "\n"

    def write(self, output_dir: str | Path) -> dict[str, Path]:
        """Write results.json, results.md and predictions.jsonl; return their paths."""
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {name: directory / name for name in (RESULTS_JSON, RESULTS_MARKDOWN, PREDICTIONS_JSONL)}
        paths[RESULTS_JSON].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        paths[RESULTS_MARKDOWN].write_text(self.to_markdown(), encoding="utf-8")
        with paths[PREDICTIONS_JSONL].open("w", encoding="utf-8") as handle:
            for result in self.results.values():
                for prediction in result.predictions:
                    handle.write(json.dumps({"id": prediction.id, **asdict(prediction)}, ensure_ascii=False) + "\n")
        return paths


def resolve_device(device: str) -> torch.device:
    """'auto' picks the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    model_name_or_path: str,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a base model (and a PERFT or any PEFT adapter on top) with its tokenizer, ready for generation.

    ``tokenizer`` names the tokenizer's folder or Hub id when the model's own has none. PERFT adapters load because
    importing this module imported `peft_perft`, which registers the method with peft.
    """
    from peft import PeftModel
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {DTYPES}.")
    target = resolve_device(device)
    loaded_tokenizer = load_tokenizer(tokenizer or model_name_or_path)  # first: it fails in a second, weights do not
    model_class = text_generation_class(AutoConfig.from_pretrained(model_name_or_path), model_name_or_path)
    model = model_class.from_pretrained(
        model_name_or_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=str(target)
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.to(target).eval(), loaded_tokenizer


def text_generation_class(config: PretrainedConfig, name: str) -> type:
    """The auto class that generates text from a text prompt for ``config``: the causal LM where Transformers has
    one, else the image-text-to-text model, which with no image runs its language tower on the prompt alone
    (Qwen3-VL-MoE, ERNIE-4.5-VL, ...). Encoder-decoder and other models are refused by name: the evaluation
    generates from left-padded decoder-only prompts."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto_class._model_mapping:
            return auto_class
    raise ValueError(
        f"{name} is a {config.model_type!r} model ({type(config).__name__}), which Transformers builds neither as a "
        f"causal LM nor as an image-text-to-text model: the evaluation generates answers from decoder-only text "
        f"prompts, so encoder-decoder MoE models (Switch Transformers, NLLB-MoE) are not evaluated here. Score them "
        f"with their seq2seq generate() in your own loop."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``name_or_path``; an error where there is none.

    Transformers builds an empty tokenizer for a folder without tokenizer files instead of failing, and generation
    then dies in an IndexError far from the cause.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_ids):
        raise ValueError(
            f"{name_or_path} has no tokenizer (its vocabulary holds only special tokens): pass the base model's "
            f"tokenizer (load_model(..., tokenizer=...); --tokenizer on the command line)."
        )
    return tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder-only batches must be padded on the left so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
        tokenizer.pad_token = tokenizer.eos_token


def _generation_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, **options: Any) -> GenerationConfig:
    """Deterministic decoding (greedy or beam search) whatever sampling defaults the checkpoint ships."""
    model_defaults = getattr(model, "generation_config", None)
    eos_token_id = getattr(model_defaults, "eos_token_id", None) or tokenizer.eos_token_id
    return GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_token_id, **options)


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: GenerationConfig
) -> list[str]:
    """Generate continuations of left-padded prompts; return only the new text."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    encoded = encoded.to(model.device)
    output = model.generate(**encoded, generation_config=config)
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def _refuse_prompts_past_the_context(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, prompts: list[str], max_new_tokens: int
) -> None:
    """Prompts that do not fit the model's context with the answer would be scored on cut or out-of-range positions
    (near 0% with no word of why): refuse them before generating, saying how many and by how much."""
    if not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    overflow = prompts_past_the_context(model.config, lengths, max_new_tokens)
    if overflow is not None:
        raise ValueError(
            f"{len(overflow.too_long)} of {overflow.prompts} {task} prompts plus {max_new_tokens} new tokens exceed "
            f"the model's context of {overflow.context} positions (longest prompt {overflow.longest} tokens); it "
            f"would score them on cut text. Evaluate a model with a longer context, or pass a smaller --max-new-tokens."
        )


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    records: list[dict[str, Any]],
    settings: GenerationSettings = GenerationSettings(),
) -> TaskResult:
    """Generate an answer for every record of one task and score it."""
    spec = get_task(task)
    _prepare_tokenizer(tokenizer)
    config = _generation_config(
        model,
        tokenizer,
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens or spec.default_max_new_tokens,
    )
    prompts = [build_prompt(record) for record in records]
    _refuse_prompts_past_the_context(model, tokenizer, spec.name, prompts, config.max_new_tokens)
    # Longest prompts first: batches hold similar lengths (less padding) and memory errors surface at once.
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    generated: dict[int, str] = {}
    with tqdm(total=len(prompts), desc=spec.name, unit="prompt") as progress:
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            texts = generate_batch(model, tokenizer, [prompts[index] for index in batch], config)
            generated.update(zip(batch, texts, strict=True))
            progress.update(len(batch))
    predictions = []
    for index, record in enumerate(records):
        parsed = extract_answer(spec.name, generated[index])
        gold = str(record["answer"])
        predictions.append(
            Prediction(
                spec.name, index, prompts[index], generated[index], parsed, gold, score_answer(spec.name, parsed, gold)
            )
        )
    return TaskResult(spec.name, predictions)


def evaluate(
    model: torch.nn.Module | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_source: str | Path,
    tasks: list[str] | None = None,
    settings: GenerationSettings = GenerationSettings(),
    max_samples: int | None = None,
) -> EvaluationReport:
    """Evaluate on the given tasks (default: those the source holds) with the LLM-Adapters protocol."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in resolve_tasks(tasks, data_source):
            records = load_task_records(task, data_source, max_samples)
            results[task] = evaluate_task(model, tokenizer, task, records, settings)
    finally:
        model.train(was_training)
    metadata = {"data_source": str(data_source), "max_samples": max_samples, "generation": asdict(settings)}
    return EvaluationReport(results, metadata)
