"""Non-finite adapter outputs and router probabilities are caught and reported with the layer name."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.monitor.health import NonFiniteError, NumericsCallback, NumericsGuard


def perft_r_model() -> torch.nn.Module:
    return get_peft_model(build_tiny(), PerftConfig(variant="R", r=4, num_experts=3, init_weights=False))


def blocks(model: torch.nn.Module) -> list[PerftMoeBlock]:
    return [module for module in model.modules() if isinstance(module, PerftMoeBlock)]


def test_finite_runs_pass_and_a_nan_adapter_is_named(tokens) -> None:
    model = perft_r_model()
    with NumericsGuard(model) as guard:
        model(tokens)
        guard.check()
        with torch.no_grad():
            blocks(model)[1].perft_B["default"][0, 0, 0] = float("nan")
        model(tokens)
        with pytest.raises(NonFiniteError) as error:
            guard.check()
    message = str(error.value)
    assert "model.layers.1.mlp: non-finite block output" in message
    assert "layers.0" not in message and "router probabilities" not in message
    guard.check()  # flags were reset by the failed check


def test_a_diverging_router_is_named(tokens) -> None:
    model = perft_r_model()
    with torch.no_grad():
        blocks(model)[0].perft_router["default"].fill_(float("inf"))
    with NumericsGuard(model) as guard:
        model(tokens)
        with pytest.raises(NonFiniteError, match=r"layers\.0\.mlp: non-finite PERFT-R router probabilities"):
            guard.check()


def test_callback_stops_a_diverging_trainer_run(tmp_path) -> None:
    model = perft_r_model()
    rows = torch.randint(3, 64, (8, 6), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        logging_steps=1,
        learning_rate=1e38,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        optim="sgd",
        max_grad_norm=0.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[NumericsCallback()])
    with pytest.raises(NonFiniteError, match=r"model\.layers\.\d\.mlp"):
        trainer.train()
    assert trainer.state.global_step < 4


def test_guard_refuses_a_model_without_perft() -> None:
    with pytest.raises(ValueError, match="no PERFT layer"):
        NumericsGuard(build_tiny())
