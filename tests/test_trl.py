"""TRL's SFTTrainer, unchanged, trains PERFT adapters: from a PerftConfig or a pre-wrapped PeftModel, with the
aux loss in the loss and the logs, with gradient checkpointing, resuming exactly, saving only the adapter."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import string
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, char_tokenizer, tiny_mixtral_config
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.evaluation import build_prompt
from peft_perft.monitor import add_routing_monitor

CHARACTERS = string.ascii_lowercase + " =>"


def reversal_dataset(num_examples: int = 12) -> Dataset:
    """Prompt/completion pairs: reverse a short word (learnable, so the loss can fall)."""
    words = ["abc", "moe", "peft", "route", "xyz", "lora"]
    rows = [{"prompt": f"{word} =>", "completion": f" {word[::-1]}"} for word in words]
    return Dataset.from_list([rows[index % len(rows)] for index in range(num_examples)])


def perft_r_config(**overrides) -> PerftConfig:
    settings = {"variant": "R", "r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, "router_aux_loss_coef": 0.01}
    settings.update(overrides)
    return PerftConfig(**settings)


def sft_config(output_dir: Path, **overrides) -> SFTConfig:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "seed": 0,
        "activation_checkpointing": False,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return SFTConfig(**settings)


def sft_trainer(model: torch.nn.Module, args: SFTConfig, peft_config: PerftConfig | None = None) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=reversal_dataset(),
        processing_class=char_tokenizer(CHARACTERS),
        peft_config=peft_config,
    )


def tiny_moe() -> torch.nn.Module:
    """The tiny OLMoE with its load-balancing loss on, as TRL trains MoE models."""
    return build_tiny(router_aux_loss_coef=0.01, output_router_logits=True).train()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters() if "perft_" in name}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters() if "perft_" not in name}


def routers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [module.perft_router["default"] for module in model.modules() if isinstance(module, PerftMoeBlock)]


def reference_perft_aux_loss(forward: dict, config: PerftConfig) -> float:
    """PERFT-R's weighted load-balancing loss from the paper/Switch formula: coef * N * sum_i f_i P_i, with f the
    fraction of top-k slots and P the mean router probability, over the real tokens of all layers together.
    ``forward`` comes from `record_forwards`; router logits use the autocast the model ran under (TRL: bf16)."""
    autocast, mask = forward["autocast"], forward["mask"]
    dispatched, probabilities = [], []
    for hidden, weight in zip(forward["hidden"], forward["routers"], strict=True):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = torch.nn.functional.linear(hidden.float(), weight.float())
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top = probs.topk(config.top_k, dim=-1).indices
        dispatched.append(torch.zeros_like(probs, dtype=torch.float64).scatter(1, top, 1.0))
        probabilities.append(probs.double())
    token_weight = torch.ones(len(forward["hidden"][0])) if mask is None else mask.reshape(-1).double()
    token_weight = token_weight.repeat(len(forward["hidden"]))[:, None]
    fraction = (torch.cat(dispatched) * token_weight).sum(0) / token_weight.sum()
    mean_probability = (torch.cat(probabilities) * token_weight).sum(0) / token_weight.sum()
    return float(config.router_aux_loss_coef * config.num_experts * (fraction * mean_probability).sum())


def record_forwards(model: torch.nn.Module) -> list[dict]:
    """Per forward of the whole model: its attention mask, every adapted block's input and the model output."""
    forwards: list[dict] = []
    root = model.get_base_model()

    def start(module, args, kwargs):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        forwards.append({"mask": kwargs.get("attention_mask"), "hidden": [], "routers": [], "autocast": autocast})

    def block_input(module, args):
        forwards[-1]["hidden"].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        forwards[-1]["routers"].append(module.perft_router["default"].detach().clone())

    def finish(module, args, output):
        forwards[-1]["output"] = output

    root.register_forward_pre_hook(start, with_kwargs=True)
    root.register_forward_hook(finish)
    for module in model.modules():
        if isinstance(module, PerftMoeBlock):
            module.register_forward_pre_hook(block_input)
    return forwards


def losses(trainer: SFTTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 6-step run from a PerftConfig, with dropout, saving at steps 3 and 6."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_moe()
    base_before = base_state(model)
    trainer = sft_trainer(
        model, sft_config(output_dir, save_strategy="steps", save_steps=3), perft_r_config(lora_dropout=0.05)
    )
    monitor = add_routing_monitor(trainer, save_at_end=False)
    forwards = record_forwards(trainer.model)
    trainer.train()
    return {
        "trainer": trainer,
        "monitor": monitor,
        "output_dir": output_dir,
        "base_before": base_before,
        "forwards": forwards,
        "final_adapter": adapter_state(trainer.model),
    }


def test_sft_trainer_with_perft_config_trains_the_adapter_only(checkpointed_run: dict) -> None:
    trainer = checkpointed_run["trainer"]
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].variant == "R"
    history = losses(trainer)
    assert len(history) == 6
    assert sum(history[-2:]) / 2 < sum(history[:2]) / 2 - 0.2
    base_after = base_state(trainer.model.get_base_model())
    unwrapped_before = checkpointed_run["base_before"]
    assert len(base_after) == len(unwrapped_before)
    for before, after in zip(unwrapped_before.values(), base_after.values(), strict=True):
        assert torch.equal(before, after)
    assert any(
        torch.count_nonzero(value) for name, value in checkpointed_run["final_adapter"].items() if "perft_B" in name
    )


def test_perft_aux_loss_is_logged_beside_the_base_aux_loss(checkpointed_run: dict) -> None:
    trainer = checkpointed_run["trainer"]
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("aux_loss" in entry and "perft_aux_loss" in entry for entry in training_logs)
    forwards = checkpointed_run["forwards"]
    assert len(forwards) == len(training_logs)  # one forward per step, logging every step
    config = trainer.model.peft_config["default"]
    for entry, forward in zip(training_logs, forwards, strict=True):
        expected = reference_perft_aux_loss(forward, config)
        assert entry["perft_aux_loss"] == pytest.approx(expected, rel=1e-5)
        assert 0 < entry["perft_aux_loss"] < entry["aux_loss"]


def test_perft_aux_loss_enters_the_sft_loss(tmp_path: Path) -> None:
    # With B = 0 the adapter output is 0 whatever the routing, so the main loss gives the router no gradient:
    # after one step the router has moved only if the aux loss is part of the loss TRL differentiates.
    trainer = sft_trainer(tiny_moe(), sft_config(tmp_path, max_steps=1), perft_r_config(router_aux_loss_coef=1.0))
    before = [router.detach().clone() for router in routers(trainer.model)]
    trainer.train()
    moved = [not torch.equal(start, router) for start, router in zip(before, routers(trainer.model), strict=True)]
    assert all(moved), "PERFT-R's router did not move: its aux loss never reached the loss SFTTrainer optimises"


def test_prewrapped_peft_model_trains(tmp_path: Path) -> None:
    peft_model = get_peft_model(tiny_moe(), perft_r_config())
    adapter_before = adapter_state(peft_model)
    base_before = base_state(peft_model)
    trainer = sft_trainer(peft_model, sft_config(tmp_path))
    trainer.train()
    assert trainer.model is peft_model
    history = losses(trainer)
    assert sum(history[-2:]) / 2 < sum(history[:2]) / 2 - 0.2
    changed = [
        name for name, value in adapter_state(peft_model).items() if not torch.equal(value, adapter_before[name])
    ]
    assert any("perft_A" in name for name in changed) and any("perft_B" in name for name in changed)
    for name, value in base_state(peft_model).items():
        assert torch.equal(value, base_before[name]), name


def test_gradient_checkpointing_trains_like_plain_training(tmp_path: Path) -> None:
    results = {}
    for checkpointing in (False, True):
        args = sft_config(tmp_path / str(checkpointing), max_steps=3, activation_checkpointing=checkpointing)
        trainer = sft_trainer(tiny_moe(), args, perft_r_config())
        monitor = add_routing_monitor(trainer, save_at_end=False)
        trainer.train()
        assert trainer.model.get_base_model().is_activation_checkpointing == checkpointing
        results[checkpointing] = (adapter_state(trainer.model), losses(trainer), monitor.report())
    (plain, plain_losses, plain_report), (checkpointed, checkpointed_losses, checkpointed_report) = results.values()
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6)
    # Recomputed forwards must not be counted twice by the monitor.
    for plain_stats, checkpointed_stats in zip(plain_report.routers, checkpointed_report.routers, strict=True):
        assert checkpointed_stats.tokens == plain_stats.tokens
        assert checkpointed_stats.load == pytest.approx(plain_stats.load)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(checkpointed_run: dict, tmp_path: Path) -> None:
    checkpoint = checkpointed_run["output_dir"] / "checkpoint-3"
    args = sft_config(tmp_path, save_strategy="steps", save_steps=3)
    trainer = sft_trainer(tiny_moe(), args, perft_r_config(lora_dropout=0.05))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    resumed = adapter_state(trainer.model)
    expected = checkpointed_run["final_adapter"]
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming"
    # The resumed history is the checkpoint's three entries followed by three new, identical, ones.
    assert losses(trainer) == losses(checkpointed_run["trainer"])


def test_checkpoints_hold_only_the_adapter(checkpointed_run: dict) -> None:
    adapter_names = set(checkpointed_run["final_adapter"])
    base_parameters = sum(value.numel() for value in checkpointed_run["base_before"].values())
    for step in (3, 6):
        folder = checkpointed_run["output_dir"] / f"checkpoint-{step}"
        files = {path.name for path in folder.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        tensors = load_file(folder / "adapter_model.safetensors")
        assert tensors and all("perft_" in key for key in tensors)
        assert len(tensors) == len(adapter_names)
        assert sum(value.numel() for value in tensors.values()) < base_parameters / 2
    final = load_file(checkpointed_run["output_dir"] / "checkpoint-6" / "adapter_model.safetensors")
    for key, value in final.items():
        match = [name for name in adapter_names if name.replace(".default", "") == key]
        assert len(match) == 1, key
        assert torch.equal(value, checkpointed_run["final_adapter"][match[0]])


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def save_local_model(folder: Path, family: str = "olmoe") -> Path:
    """A tiny model with its tokenizer in a folder, standing in for a Hub checkpoint."""
    build_tiny(family, router_aux_loss_coef=0.01, output_router_logits=True).save_pretrained(folder)
    char_tokenizer(CHARACTERS).save_pretrained(folder)
    return folder


def write_llm_adapters_file(path: Path) -> Path:
    records = [
        {"instruction": "Reverse the word.", "input": "abc", "output": "cba", "answer": "cba"},
        {"instruction": "Reverse the word moe.", "input": "", "output": "eom", "answer": "eom"},
    ] * 4
    path.write_text(json.dumps(records))
    return path


def test_sft_perft_script_trains_with_the_paper_defaults(tmp_path: Path) -> None:
    sft_perft = load_example("sft_perft")
    model_dir = save_local_model(tmp_path / "tiny-olmoe")
    data = write_llm_adapters_file(tmp_path / "math_tiny.json")
    output_dir = tmp_path / "run"
    argv = ["--model_name_or_path", str(model_dir), "--dataset_path", str(data), "--output_dir", str(output_dir)]
    argv += ["--perft_r", "4", "--perft_num_experts", "4", "--perft_top_k", "2", "--max_steps", "1"]
    # No --use_cpu and no --bf16 flag, as the README's command: bf16 stays off where there is no GPU.
    argv += ["--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true"]
    trainer = sft_perft.main(argv)
    assert trainer.args.bf16 == torch.cuda.is_available()
    assert trainer.args.learning_rate == 1e-5  # the paper's OLMoE rate
    assert trainer.args.num_train_epochs == 3 and trainer.args.max_length == 256
    config = trainer.model.peft_config["default"]
    assert (config.variant, config.r, config.lora_alpha, config.lora_dropout) == ("R", 4, 8, 0.05)
    assert (config.num_experts, config.top_k) == (4, 2)
    saved = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "routing"} <= saved
    assert {"routing_base.png", "routing_perft.png", "routing_report.json"} <= {
        path.name for path in (output_dir / "routing").iterdir()
    }
    examples = sft_perft.load_llm_adapters_dataset(sft_perft.ScriptArguments(dataset_path=str(data)))
    assert examples[0] == {
        "prompt": build_prompt({"instruction": "Reverse the word.", "input": "abc"}),
        "completion": "cba",
    }


def test_sft_perft_flags_cover_perft_config_and_respect_precedence(tmp_path: Path) -> None:
    sft_perft = load_example("sft_perft")
    own_fields = {item.name for item in dataclasses.fields(PerftConfig)} - {
        item.name for item in dataclasses.fields(PeftConfig)
    }
    flags = {item.name.removeprefix("perft_") for item in dataclasses.fields(sft_perft.PerftArguments)}
    assert flags == own_fields
    mixtral_dir = tmp_path / "tiny-mixtral"
    tiny_mixtral_config().save_pretrained(mixtral_dir)
    base = ["--model_name_or_path", str(mixtral_dir), "--dataset_path", "unused.json", "--output_dir", str(tmp_path)]
    base.append("--use_cpu")
    _, perft_args, _, training_args, _ = sft_perft.parse_arguments(base + ["--perft_variant", "E"])
    assert training_args.learning_rate == 2e-5  # the paper's Mixtral rate
    assert perft_args.to_config().variant == "E" and perft_args.to_config().lora_alpha == 16
    config_file = tmp_path / "run.yaml"
    config_file.write_text("learning_rate: 0.0003\nperft_r: 16\nnum_train_epochs: 1\n")
    _, perft_args, _, training_args, _ = sft_perft.parse_arguments(
        base + ["--config", str(config_file), "--num_train_epochs", "2"]
    )
    assert training_args.learning_rate == 3e-4  # the file beats the paper default
    assert training_args.num_train_epochs == 2  # the command line beats the file
    assert perft_args.to_config().lora_alpha == 32
    with pytest.raises(ValueError, match="--use_peft configures a LoRA adapter"):
        sft_perft.parse_arguments(base + ["--use_peft"])


def test_quickstart_runs_as_written_on_a_local_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's own code, with the Hub model and dataset swapped for local stand-ins."""
    source = (EXAMPLES / "quickstart.py").read_text()
    hub_model = '"allenai/OLMoE-1B-7B-0924"'
    assert hub_model in source
    model_dir = save_local_model(tmp_path / "tiny-olmoe")
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: reversal_dataset(8))
    monkeypatch.chdir(tmp_path)
    # Two steps here; the copied lines stay as they are (no use_cpu: their bf16 setting must already suit a CPU).
    monkeypatch.setattr("trl.SFTConfig", functools.partial(SFTConfig, max_steps=2, report_to="none"))
    monkeypatch.setattr("sys.argv", ["quickstart.py"])
    exec(compile(source.replace(hub_model, repr(str(model_dir))), "quickstart.py", "exec"), {"__name__": "__main__"})
    saved = {path.name for path in (tmp_path / "olmoe-perft-r").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin"}


def test_sft_trainer_takes_the_bundled_model_folder_as_written_in_the_docs(tmp_path: Path) -> None:
    """``SFTTrainer(model=BUNDLED_MODEL_DIR, ...)``, as a user substitutes it into docs/training.md's snippet: TRL
    loads the model and its tokenizer from the folder and trains the PERFT adapter."""
    from peft_perft.demo import BUNDLED_MODEL_DIR

    trainer = SFTTrainer(
        model=BUNDLED_MODEL_DIR,
        args=sft_config(tmp_path, max_steps=1, per_device_train_batch_size=2),
        train_dataset=reversal_dataset(4),
        peft_config=PerftConfig(variant="S", r=2, lora_alpha=4),
    )
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)
    assert any(not torch.equal(after[name], value) for name, value in before.items() if "perft_B" in name)
