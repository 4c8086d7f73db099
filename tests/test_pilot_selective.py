"""The pilot's selective PERFT-E (``--configs E,E_sel``): the experts its training slice uses, at the shared budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SPECIAL_TOKENS, build_tiny, char_tokenizer
from test_pilot import CHARACTERS, HIDDEN, examples

from peft_perft.pilot import PilotSettings
from peft_perft.pilot.run import load_pilot_data, run_pilot
from peft_perft.selection import select_experts


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-olmoe")
    build_tiny(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS)).save_pretrained(directory)
    char_tokenizer(CHARACTERS).save_pretrained(directory)
    return directory


def test_selective_e_trains_beside_full_e_at_the_same_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    """E_sel adapts the experts carrying 80% of the training slice's routing (measured independently here on the
    same slice) at the rank closest to the budget: fewer experts than full E, so a higher rank; both train."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples(80)))
    settings = PilotSettings(
        model=str(tiny_model_dir),
        dataset=str(data),
        configs=("E", "E_sel"),
        max_steps=5,
        batch_size=8,
        train_samples=32,
        eval_samples=8,
        output_dir=str(tmp_path / "pilot"),
    )
    lines: list[str] = []
    report = run_pilot(settings, log=lines.append)
    results = {result.name: result for result in report.results}
    assert list(results) == ["PERFT-E", "PERFT-E sel."]
    base = build_tiny(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS))
    train = load_pilot_data(settings).train.select_columns(["prompt", "completion"])
    selection = select_experts(base, train, mass=0.8, tokenizer=char_tokenizer(CHARACTERS), batch_size=8)
    adapted = sum(len(experts) for experts in selection.experts.values())
    assert adapted < 2 * 4  # the tiny model: 2 MoE blocks of 4 experts
    assert any(f"{adapted} of 8 experts carry 80%" in line for line in lines)

    def size(rank: int) -> int:
        return adapted * 2 * rank * HIDDEN

    selective = results["PERFT-E sel."]
    assert selective.trainable_parameters == size(selective.rank)
    assert all(abs(size(selective.rank) - report.budget) <= abs(size(r) - report.budget) for r in range(1, 99))
    assert selective.rank > results["PERFT-E"].rank
    assert all(result.steps == 5 and result.eval_loss > 0 for result in results.values())
