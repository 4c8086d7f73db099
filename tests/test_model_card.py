"""The PERFT model card written by save_pretrained: content, template, details, and respect for existing cards."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch
from conftest import build_tiny, char_tokenizer
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_perft
from peft_perft.evaluation import EvaluationReport, Prediction, TaskResult
from peft_perft.hub.model_card import (
    CARD_MARKER,
    MISSING_INFORMATION,
    render_model_card,
    set_card_details,
    template_path,
    write_model_card,
)
from peft_perft.monitor import routing_report

HUB_BASE_ID = "perft-tests/tiny-olmoe"
HIDDEN, LAYERS, BASE_EXPERTS = 32, 2, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft looks the base model up on the Hub when saving; offline mode keeps these tests off the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def perft_model(variant: str = "R", **config) -> PeftModel:
    """A tiny OLMoE that says it came from the Hub, with a PERFT adapter."""
    base = build_tiny()
    base.name_or_path = base.config._name_or_path = HUB_BASE_ID
    return get_peft_model(base, peft_perft.PerftConfig(variant=variant, r=4, **config))


def saved_card(model: PeftModel, directory: Path) -> ModelCard:
    model.save_pretrained(directory)
    return ModelCard.load(directory / "README.md")


def expected_parameters(variant: str, r: int = 4) -> int:
    """Adapter size from the paper's shapes: per block N experts of A (r x D) and B (D x r), plus R's router (N x D)."""
    experts = {"R": 8, "E": BASE_EXPERTS, "D": 2, "S": 1}[variant]
    router = experts * HIDDEN if variant == "R" else 0
    return LAYERS * (experts * 2 * r * HIDDEN + router)


def table(card: ModelCard) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card.text, flags=re.MULTILINE))


@pytest.mark.parametrize(
    ("variant", "experts", "active"), [("R", "8", "2"), ("E", "4", "2"), ("D", "2", "2"), ("S", "1", "1")]
)
def test_card_describes_each_variant(tmp_path: Path, variant: str, experts: str, active: str) -> None:
    card = saved_card(perft_model(variant), tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")

    assert card.data.library_name == "peft"
    assert card.data.base_model == HUB_BASE_ID
    assert {"peft", "perft", "moe", f"perft-{variant.lower()}"} <= set(card.data.tags)
    assert f"# PERFT-{variant} adapter for {HUB_BASE_ID}" in card.text
    settings = table(card)
    assert settings["adapter experts per MoE block"] == experts
    assert settings["active adapter experts per token"] == active
    assert settings["rank r"] == "4"
    assert settings["adapted MoE blocks"] == f"{LAYERS} (hidden size {HIDDEN})"
    count = sum(tensor.numel() for tensor in weights.values())
    assert count == expected_parameters(variant)
    assert f"**Trainable parameters:** {count:,} of " in card.text


def test_card_explains_the_configuration_in_words(tmp_path: Path) -> None:
    routed = saved_card(perft_model("R", num_experts=6, top_k=3, adapter_type="parallel_adapter"), tmp_path / "r")
    embedded = saved_card(perft_model("E"), tmp_path / "e")

    assert "6 adapter experts, each a rank-4 bottleneck" in routed.text
    assert "SiLU between them" in routed.text
    assert "sends the token to its top-3" in routed.text
    assert table(routed)["router load-balancing loss weight"] == "0.01"
    assert "The model's frozen router picks and weights them" in embedded.text
    assert "router load-balancing loss weight" not in table(embedded)


def test_card_comes_from_the_template_with_peft_metadata(tmp_path: Path) -> None:
    card = saved_card(perft_model(task_type="CAUSAL_LM"), tmp_path)
    template_headings = re.findall(r"^#+ [^{\n]+$", template_path().read_text(), flags=re.MULTILINE)

    assert template_path().parent.name == "model_cards"
    assert template_headings and all(heading in card.text.splitlines() for heading in template_headings)
    assert CARD_MARKER in card.text
    versions = card.text.split("### Framework versions", 1)[1]
    assert f"- PEFT {peft.__version__}" in versions and f"- peft-perft {peft_perft.__version__}" in versions
    assert card.data.pipeline_tag == "text-generation"


def test_loading_snippet_runs_and_reproduces_the_model(tmp_path: Path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build_tiny().save_pretrained(base_dir)
    char_tokenizer("abc").save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), peft_perft.PerftConfig(variant="D", r=2, init_weights=False)
    )
    card = saved_card(model, adapter_dir)
    # The Hub accepts only repo ids as base_model, and a card must not publish this machine's paths.
    assert card.data.base_model is None and not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert str(tmp_path) not in str(card) and "/tmp" not in str(card)
    snippet = re.search(r"```python\n(.*?)```", card.text, flags=re.DOTALL).group(1)
    assert "import peft_perft" not in snippet  # installed peft-perft registers itself when peft is imported
    assert '"path/to/base"' in snippet and '"path/to/this/adapter"' in snippet
    snippet = snippet.replace("path/to/base", str(base_dir)).replace("path/to/this/adapter", str(adapter_dir))

    namespace: dict = {}
    exec(compile(snippet, "model card snippet", "exec"), namespace)

    tokens = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(tokens).logits, model.eval()(tokens).logits)
    assert namespace["tokenizer"].convert_ids_to_tokens(5) == "c"


def test_card_counts_parameters_as_the_clis_do(tmp_path: Path) -> None:
    model = perft_model("R")
    trainable, total = model.get_nb_trainable_parameters()
    card = saved_card(model, tmp_path)
    assert f"**Trainable parameters:** {trainable:,} of {total:,} ({100 * trainable / total:.2f}%" in card.text


def evaluation_report() -> EvaluationReport:
    predictions = [
        Prediction("boolq", index, "prompt", text, text, "true", text == "true")
        for index, text in enumerate(["true", "false", "true", "true"])
    ]
    settings = {"batch_size": 8, "num_beams": 4, "max_new_tokens": None}
    metadata = {"data_source": "/home/me/LLM-Adapters/dataset", "max_samples": 50, "generation": settings}
    return EvaluationReport({"boolq": TaskResult("boolq", predictions)}, metadata)


def test_card_shows_the_details_the_user_attached(tmp_path: Path) -> None:
    model = perft_model()
    report = evaluation_report()
    set_card_details(
        model,
        training_data="commonsense_170k from LLM-Adapters, 3 epochs",
        datasets=["perft-tests/commonsense"],
        evaluation=report,
        routing_summary={"layer 0": {"expert 0": 0.25, "expert 1": 0.75}},
        extra_tags=["my-experiment"],
    )
    card = saved_card(model, tmp_path)

    sections = dict(re.findall(r"^## (.+?)\n\n(.*?)(?=\n## |\n### |\Z)", card.text, flags=re.MULTILINE | re.DOTALL))
    assert sections["Training data"].strip() == "commonsense_170k from LLM-Adapters, 3 epochs"
    assert sections["Evaluation results"].strip().endswith(report.to_markdown().strip())
    protocol = sections["Evaluation results"].split("\n")[0]
    assert protocol.startswith("**Protocol:** `peft-perft eval`") and "beam search with 4 beams" in protocol
    assert "the first 50 records of each task" in protocol and "`dataset`" in protocol and "/home/me" not in protocol
    assert "| **average** (1 tasks) | | | **75.00** |" in sections["Evaluation results"]
    assert "| layer 0 | expert 0: 0.25, expert 1: 0.75 |" in sections["Routing summary"]
    assert card.data.datasets == ["perft-tests/commonsense"]
    assert "my-experiment" in card.data.tags


def test_card_shows_the_routing_monitor_report(tmp_path: Path, tokens: torch.Tensor) -> None:
    model = perft_model("R")
    report = routing_report(model, {"input_ids": tokens})
    set_card_details(model, routing_summary=report)
    card = saved_card(model, tmp_path)

    rows = re.findall(r"^\| (\d+) \| (\w+) \| (\d+) \| (\S+) \| ([\d,]+) \|", card.text, flags=re.MULTILINE)
    assert len(rows) == len(report.routers) == 2 * LAYERS  # the base router and the PERFT-R router of each layer
    assert {(router, experts, top_k) for _, router, experts, top_k, _ in rows} == {
        ("base", "4", "2"),
        ("perft", "8", "2"),
    }
    assert all(int(count.replace(",", "")) == tokens.numel() for *_, count in rows)
    assert f"over {report.forward_passes} forward passes" in card.text


def test_unknown_details_are_marked_missing(tmp_path: Path) -> None:
    card = saved_card(perft_model(), tmp_path)
    for heading in ("## Training data", "## Evaluation results", "## Routing summary"):
        assert card.text.split(heading, 1)[1].lstrip().startswith(MISSING_INFORMATION)
    with pytest.raises(TypeError, match="unknown field"):
        set_card_details(perft_model(), accuracy=0.9)


def test_a_hand_written_card_is_kept_and_tagged(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My own card\n\nWritten by hand.\n")
    card = saved_card(perft_model(), tmp_path)

    assert "# My own card" in card.text and CARD_MARKER not in card.text
    assert card.data.license == "mit"
    assert card.data.library_name == "peft"
    assert {"perft", "moe"} <= set(card.data.tags)


def test_saving_again_refreshes_the_perft_card_and_keeps_added_metadata(tmp_path: Path) -> None:
    model = perft_model()
    first = saved_card(model, tmp_path)
    first.data.license = "apache-2.0"
    first.save(tmp_path / "README.md")
    set_card_details(model, training_data="the demo task")

    second = saved_card(model, tmp_path)

    assert second.data.license == "apache-2.0"
    assert "## Training data\n\nthe demo task" in second.text
    assert second.text.count(CARD_MARKER) == 1


def test_write_model_card_adds_results_after_saving(tmp_path: Path) -> None:
    model = perft_model()
    model.save_pretrained(tmp_path)
    set_card_details(model, evaluation={"boolq": 0.625})

    write_model_card(model, tmp_path, adapter_id="me/my-adapter")

    card = ModelCard.load(tmp_path / "README.md")
    assert "| boolq | 0.625 |" in card.text
    assert 'PeftModel.from_pretrained(base, "me/my-adapter")' in card.text
    assert card.data.library_name == "peft"


def test_every_perft_adapter_is_described(tmp_path: Path) -> None:
    model = perft_model("R")
    model.add_adapter("small", peft_perft.PerftConfig(variant="S", r=2))
    card = saved_card(model, tmp_path)

    assert "## Adapter `default`: PERFT-R" in card.text and "## Adapter `small`: PERFT-S" in card.text
    assert f"**Trainable parameters:** {expected_parameters('S', r=2):,} of " in card.text
    assert {"perft-r", "perft-s"} <= set(card.data.tags)


def test_other_peft_methods_keep_peft_card(tmp_path: Path) -> None:
    model = get_peft_model(build_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    card = saved_card(model, tmp_path)

    assert CARD_MARKER not in card.text and "perft" not in (card.data.tags or [])
    with pytest.raises(ValueError, match="no PERFT adapter"):
        render_model_card(model)
