"""TRL's GRPOTrainer, unchanged, trains every PERFT variant: one step moves the adapter by exactly the policy
gradient recomputed here from the rollout TRL scored, the adapter saves and reloads, the base stays frozen, the
routing monitor counts the update's forwards (not the generation's), and PERFT-R's aux loss reaches the loss. With
add_routing_replay, GRPOTrainer scores every rollout with the routing it was generated with."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, char_tokenizer
from datasets import Dataset
from peft import PeftModel
from test_routing_replay import RoutingSpy
from trl import GRPOConfig, GRPOTrainer

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.monitor import add_routing_monitor
from peft_perft.routing_replay import ROUTING_COLUMN, RecordedRouting, add_routing_replay

CHARACTERS = string.ascii_lowercase + " =>"
PROMPTS = ["abc =>", "moe =>", "peft =>", "xyz =>"]  # two lengths, so generation batches are left-padded
REWARDED = set("abcdefghijklm")
LEARNING_RATE = 1.0

VARIANTS = {
    "R": {"variant": "R", "num_experts": 4, "top_k": 2},
    "E": {"variant": "E"},
    "D": {"variant": "D", "num_experts": 2},
    "S": {"variant": "S"},
}


def first_half_share(completions: list[str], **kwargs) -> list[float]:
    """The reward: the share of completion characters from the first half of the alphabet (varies per sample)."""
    return [sum(character in REWARDED for character in text) / max(len(text), 1) for text in completions]


def perft_config(variant: str, **overrides) -> PerftConfig:
    """B random (init_weights=False), so that one step's gradient reaches A as well as B."""
    settings = {"r": 4, "lora_alpha": 8, "init_weights": False, **VARIANTS[variant], **overrides}
    return PerftConfig(**settings)


def grpo_config(output_dir: Path, **overrides) -> GRPOConfig:
    """One plain SGD step (constant rate, no clipping, no KL, no aux loss): the update is -lr * gradient."""
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 3,
        "loss_type": "bnpo",
        "beta": 0.0,
        "router_aux_loss_coef": 0.0,
        "optim": "sgd",
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1e9,
        "disable_dropout": True,
        "bf16": False,  # TRL defaults to bf16 autocast, also on CPU; fp32 keeps the reference comparison tight
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "seed": 0,
        "activation_checkpointing": False,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


def grpo_trainer(args: GRPOConfig, config: PerftConfig) -> GRPOTrainer:
    # No output_router_logits in the config: GRPOTrainer asks for router logits on its scoring calls only.
    return GRPOTrainer(
        model=build_tiny(router_aux_loss_coef=0.01).train(),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS]),
        processing_class=char_tokenizer(CHARACTERS),
        reward_funcs=first_half_share,
        peft_config=config,
    )


def record_scored_batches(trainer: GRPOTrainer) -> list[dict[str, torch.Tensor]]:
    """The batches GRPOTrainer scores for its loss (rollout, masks, advantages), kept as they were."""
    batches: list[dict[str, torch.Tensor]] = []
    compute_loss = trainer._compute_loss

    def recording(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        batches.append({key: value.clone() for key, value in inputs.items() if isinstance(value, torch.Tensor)})
        return compute_loss(model, inputs)

    trainer._compute_loss = recording
    return batches


def named_parameters(model: torch.nn.Module, adapter: bool) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters() if ("perft_" in name) == adapter}


def reference_policy_gradient(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of GRPO's first-step loss, recomputed from plain logits: with the old policy equal to the
    current one the importance ratio is 1 and its gradient is that of the log-probabilities, so
    d/dθ [-sum_t A_i log p(y_t) / #tokens] over the completion tokens (TRL's ``bnpo`` normalisation)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    completion_length = batch["completion_ids"].shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -completion_length - 1 : -1]
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    mask = batch["completion_mask"].float()
    loss = -(batch["advantages"][:, None] * log_probs * mask).sum() / mask.sum()
    parameters = {name: value for name, value in model.named_parameters() if value.requires_grad}
    gradients = torch.autograd.grad(loss, list(parameters.values()))
    return dict(zip(parameters, gradients, strict=True))


@pytest.fixture(scope="module", params=list(VARIANTS))
def one_step(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One GRPO step of one variant, with the routing monitor on, and what it started from."""
    variant = request.param
    trainer = grpo_trainer(grpo_config(tmp_path_factory.mktemp(f"grpo-{variant}")), perft_config(variant))
    monitor = add_routing_monitor(trainer, save_at_end=False)
    batches = record_scored_batches(trainer)
    adapter_before = named_parameters(trainer.model, adapter=True)
    base_before = named_parameters(trainer.model, adapter=False)
    trainer.train()
    return {
        "variant": variant,
        "trainer": trainer,
        "monitor": monitor,
        "batches": batches,
        "adapter_before": adapter_before,
        "base_before": base_before,
    }


def test_one_grpo_step_is_the_policy_gradient_step(one_step: dict) -> None:
    trainer, batches = one_step["trainer"], one_step["batches"]
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].variant == one_step["variant"]
    assert len(batches) == 1 and batches[0]["advantages"].abs().sum() > 0, "the rollout gave no learning signal"
    adapter_after = named_parameters(trainer.model, adapter=True)
    for name, value in named_parameters(trainer.model, adapter=False).items():
        assert torch.equal(value, one_step["base_before"][name]), f"{name}: the frozen base moved"
    with torch.no_grad():  # back to the weights the step started from, to differentiate there
        for name, parameter in trainer.model.named_parameters():
            if name in one_step["adapter_before"]:
                parameter.copy_(one_step["adapter_before"][name])
    gradients = reference_policy_gradient(trainer.model, batches[0])
    assert set(gradients) == set(adapter_after)
    for name, gradient in gradients.items():
        step = one_step["adapter_before"][name] - adapter_after[name]
        assert gradient.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(step, LEARNING_RATE * gradient, rtol=1e-4, atol=1e-7, msg=name)


def test_grpo_adapter_saves_and_reloads(one_step: dict, tmp_path: Path) -> None:
    trainer = one_step["trainer"]
    trainer.save_model(str(tmp_path))
    saved = {path.name for path in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin"}
    reloaded = PeftModel.from_pretrained(build_tiny(router_aux_loss_coef=0.01), str(tmp_path)).eval()
    trained = trainer.model.eval()
    batch = char_tokenizer(CHARACTERS)(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        expected = trained(**batch).logits
        with trained.disable_adapter():
            base_logits = trained(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)
    assert not torch.allclose(expected, base_logits), "the trained adapter does not change the model"


def test_routing_monitor_counts_the_scoring_forward_not_the_generation(one_step: dict) -> None:
    """Generation runs in training mode without gradients; its tokens are scored again by the update's forward,
    which alone is counted: one forward, its real (unpadded) tokens in every layer."""
    report = one_step["monitor"].report()
    batch = one_step["batches"][0]
    real_tokens = float(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
    assert report.forward_passes == 1
    routers = {"R": {"base", "perft"}, "E": {"base"}, "D": {"base"}, "S": {"base"}}[one_step["variant"]]
    assert {stats.router for stats in report.routers} == routers
    for stats in report.routers:
        assert stats.tokens == real_tokens
        assert sum(stats.load) == pytest.approx(stats.top_k)


def test_perft_aux_loss_enters_the_grpo_loss(tmp_path: Path) -> None:
    # With B = 0 the adapter output is 0 whatever the routing, so the policy loss gives PERFT-R's router no
    # gradient: after one step the router has moved only if its aux loss is part of the loss GRPO optimises.
    config = perft_config("R", init_weights=True, router_aux_loss_coef=1.0)
    trainer = grpo_trainer(grpo_config(tmp_path, router_aux_loss_coef=None, learning_rate=0.1), config)
    routers = [
        module.perft_router["default"] for module in trainer.model.modules() if isinstance(module, PerftMoeBlock)
    ]
    before = [router.detach().clone() for router in routers]
    add_routing_monitor(trainer, save_at_end=False)  # logs PERFT-R's aux loss beside the base one
    trainer.train()
    assert all(not torch.equal(start, router) for start, router in zip(before, routers, strict=True))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["perft_aux_loss"] > 0 for entry in logged)
    # The model's aux_loss carries PERFT's term divided by the model's coefficient (0.01), as for SFTTrainer.
    assert all(entry["aux_loss"] > entry["perft_aux_loss"] / 0.01 for entry in logged)


def scored_routing(trainer: GRPOTrainer, replay: bool) -> tuple[list[dict], list[RecordedRouting]]:
    """Train two micro-batches of one rollout (the second after an update moved the policy) and return the scored
    batches with the routing each scoring forward used, read by hooks independent of the replay."""
    if replay:
        add_routing_replay(trainer)
    spy = RoutingSpy(trainer.model)
    batches, used = [], []
    compute_loss = trainer._compute_loss

    def recording(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        loss = compute_loss(model, inputs)
        batches.append({key: value.clone() for key, value in inputs.items() if isinstance(value, torch.Tensor)})
        used.append(spy.indices(len(inputs["prompt_ids"])))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return batches, used


def routing_agreement_on_real_tokens(used: RecordedRouting, reference: RecordedRouting, batch: dict) -> float:
    """Share of (real token, router) pairs with the same experts, over the positions generation routed (the
    rollout's last token is routed live) and the tokens the attention mask keeps."""
    real = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)[:, :-1].bool()
    same = total = 0
    for key, index in used.experts.items():
        ours = index[:, : real.shape[1]].sort(-1).values
        theirs = reference.experts[key][:, : real.shape[1]].sort(-1).values
        same += int(((ours == theirs).all(-1) & real).sum())
        total += int(real.sum())
    return same / total


@pytest.mark.parametrize("variant", ["R", "E"])
def test_grpo_with_routing_replay_scores_with_the_generation_routing(variant: str, tmp_path: Path) -> None:
    """Two micro-batches per rollout (steps_per_generation=2): the second is scored after an update. With
    add_routing_replay every scoring forward routes each real token as the model did at generation (recomputed
    here on the starting weights); without it, the moved policy routes some tokens elsewhere."""
    runs = {}
    for replay in (False, True):
        args = grpo_config(tmp_path / str(replay), max_steps=2, steps_per_generation=2, learning_rate=30.0)
        trainer = grpo_trainer(args, perft_config(variant))
        start = named_parameters(trainer.model, adapter=True)
        runs[replay] = (trainer, start, *scored_routing(trainer, replay))
    for replay, (trainer, start, batches, used) in runs.items():
        assert len(batches) == 2 and (ROUTING_COLUMN in batches[0]) == replay
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if name in start:
                    parameter.copy_(start[name])
            spy = RoutingSpy(trainer.model)
            agreements = []
            for batch, scored in zip(batches, used, strict=True):
                input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
                attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
                trainer.model(input_ids=input_ids, attention_mask=attention_mask)
                agreements.append(routing_agreement_on_real_tokens(scored, spy.indices(len(input_ids)), batch))
        if replay:
            assert agreements == [1.0, 1.0]
        else:
            assert agreements[0] == 1.0 and agreements[1] < 0.99, "the update did not move the routing: no test"
