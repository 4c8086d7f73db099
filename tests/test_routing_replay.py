"""Routing replay: the experts recorded while a rollout is generated are the experts its scoring forward uses, for
the base router (and so PERFT-E, which reuses it) and for PERFT-R's own router; the weights come from the current
routers; the scored log-probabilities equal those at generation; the recording's size is what its shapes say."""

from __future__ import annotations

import string

import pytest
import torch
from conftest import build_tiny, char_tokenizer
from peft import PeftModel, get_peft_model

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.routing_replay import BASE_ROUTER, RecordedRouting, RoutingReplay

CHARACTERS = string.ascii_lowercase + " =>"
PROMPTS = ["abc =>", "peft =>", "xyz =>"]  # two lengths: generation left-pads
NEW_TOKENS = 5
NUM_LAYERS, BASE_TOP_K, PERFT_TOP_K = 2, 2, 2

VARIANTS = {
    "R": {"variant": "R", "num_experts": 4, "top_k": PERFT_TOP_K},
    "E": {"variant": "E"},
}


def perft_model(variant: str, family: str = "olmoe") -> PeftModel:
    config = PerftConfig(r=4, lora_alpha=8, init_weights=False, **VARIANTS[variant])
    return get_peft_model(build_tiny(family), config).eval()


def blocks(model: torch.nn.Module) -> dict[str, PerftMoeBlock]:
    root = model.get_base_model()
    return {name: module for name, module in root.named_modules() if isinstance(module, PerftMoeBlock)}


def prompt_batch() -> dict[str, torch.Tensor]:
    return char_tokenizer(CHARACTERS)(PROMPTS, return_tensors="pt", padding=True, padding_side="left")


def generate(model: torch.nn.Module, prompts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampled rollout and the log-probabilities of its tokens as the model computed them while generating."""
    torch.manual_seed(0)
    output = model.generate(
        **prompts,
        do_sample=True,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    completion = output.sequences[:, prompts["input_ids"].shape[1] :]
    log_probs = torch.stack(output.logits, dim=1).log_softmax(-1).gather(-1, completion[..., None])[..., 0]
    return output.sequences, log_probs


def score(model: torch.nn.Module, sequences: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """The scoring forward of RL trainers: the whole rollout at once, log-probabilities of the completion."""
    attention_mask = torch.cat([prompt_mask, torch.ones(len(sequences), NEW_TOKENS, dtype=prompt_mask.dtype)], 1)
    logits = model(input_ids=sequences, attention_mask=attention_mask).logits[:, -NEW_TOKENS - 1 : -1]
    return logits.log_softmax(-1).gather(-1, sequences[:, -NEW_TOKENS:, None])[..., 0]


class RoutingSpy:
    """What every router used in the last forward, read independently of RoutingReplay: the indices and weights
    the base experts received (forward pre-hook on the experts), PERFT-R's routing records, and each block's and
    base router's input (to recompute the weights from the router weights here)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.used: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.blocks = blocks(model)
        for name, block in self.blocks.items():
            experts = block.spec.experts_module(block.base_layer)
            experts.register_forward_pre_hook(self._experts_call(name, block), with_kwargs=True)
            block.register_forward_pre_hook(self._block_input(name))
            block.register_forward_hook(self._perft_records(name))

    def _experts_call(self, name: str, block: PerftMoeBlock):
        def hook(module, args, kwargs):
            _, index, weight = block.spec.read_experts_call(args, kwargs)
            self.used[(name, BASE_ROUTER)] = (index.detach().clone(), weight.detach().clone())

        return hook

    def _block_input(self, name: str):
        def hook(module, args):
            self.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    def _perft_records(self, name: str):
        def hook(module, args, output):
            for adapter, record in module.routing_records.items():
                if record.router_logits is not None:
                    self.used[(name, adapter)] = (record.expert_index.clone(), record.expert_weight.detach().clone())

        return hook

    def indices(self, batch: int) -> RecordedRouting:
        return RecordedRouting(
            {key: index.reshape(batch, -1, index.shape[-1]) for key, (index, _) in self.used.items()}
        )


@pytest.mark.parametrize(("variant", "family"), [("R", "olmoe"), ("E", "olmoe"), ("E", "mixtral")])
def test_replayed_scoring_reproduces_the_generation(
    variant: str, family: str, record_property: pytest.RecordProperty
) -> None:
    model = perft_model(variant, family)
    replay, prompts, spy = RoutingReplay(model), prompt_batch(), RoutingSpy(model)
    with replay.record() as routing:
        sequences, generated = generate(model, prompts)
    expected_keys = {(name, BASE_ROUTER) for name in spy.blocks}
    expected_keys |= {(name, "default") for name in spy.blocks} if variant == "R" else set()
    assert set(routing.experts) == expected_keys
    rows, positions = sequences.shape[0], sequences.shape[1] - 1  # the last token is never fed back
    assert all(value.shape == (rows, positions, 2) for value in routing.experts.values())

    with torch.no_grad():
        scored_live = score(model, sequences, prompts["attention_mask"])
        live = spy.indices(rows)
        with replay.replay(routing):
            scored_replayed = score(model, sequences, prompts["attention_mask"])
        replayed = spy.indices(rows)
    torch.testing.assert_close(scored_replayed, generated, rtol=0, atol=1e-5)
    assert replayed.rows(slice(None)).agreement(routing) == 1.0
    for key, recorded in routing.experts.items():
        assert torch.equal(replayed.experts[key][:, :positions], recorded.long()), key
    difference = (scored_live - generated).abs().max().item()
    record_property("replay_off_max_logprob_difference", difference)
    record_property("replay_off_routing_agreement", live.agreement(routing))
    print(f"replay off: max |scored - generated| log-prob = {difference:.3g}, agreement {live.agreement(routing)}")


def moved_policy(model: torch.nn.Module, variant: str) -> None:
    """What an update between generation and scoring does, exaggerated: the routers' inputs or weights change."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in blocks(model).values():
            if variant == "R":
                router = block.perft_router["default"]
                router.add_(torch.randn(router.shape, generator=generator))
            else:
                adapter = block.perft_B["default"]
                adapter.add_(10 * torch.randn(adapter.shape, generator=generator))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_replay_forces_the_recorded_experts_with_the_current_routers_weights(variant: str) -> None:
    model = perft_model(variant)
    replay, prompts, spy = RoutingReplay(model), prompt_batch(), RoutingSpy(model)
    with replay.record() as routing:
        sequences, _ = generate(model, prompts)
    moved_policy(model, variant)
    rows, positions = sequences.shape[0], sequences.shape[1] - 1
    mask = prompts["attention_mask"]
    with torch.no_grad():
        score(model, sequences, mask)
        assert spy.indices(rows).agreement(routing) < 0.9, "the moved policy routes like the old one: no test"
        score(model, sequences, mask)
    router = "default" if variant == "R" else BASE_ROUTER
    replayed_keys = [key for key in routing.experts if key[1] == router]
    with replay.replay(routing):
        log_probs = score(model, sequences, mask)
    log_probs.sum().backward()
    for key in replayed_keys:
        index, weight = spy.used[key]
        recorded = routing.experts[key].long()
        assert torch.equal(index.reshape(rows, -1, index.shape[-1])[:, :positions], recorded), key
        block = spy.blocks[key[0]]
        hidden = spy.inputs[key[0]].float()
        if variant == "R":  # PERFT-R renormalises its top-k weights: softmax over the chosen logits
            logits = hidden @ block.perft_router["default"].detach().float().T
            expected = torch.softmax(logits.gather(-1, index), dim=-1)
        else:  # OLMoE's router: softmax over all experts, not renormalised
            logits = hidden @ block.base_layer.gate.weight.float().T
            expected = torch.softmax(logits, dim=-1).gather(-1, index)
        torch.testing.assert_close(weight.float(), expected, rtol=1e-5, atol=1e-6)
    if variant == "R":  # the router still learns under replay: its weights are differentiated
        assert all(block.perft_router["default"].grad.abs().sum() > 0 for block in spy.blocks.values())


def test_recorded_routing_size_is_top_k_bytes_per_router_and_layer() -> None:
    model = perft_model("R")
    replay, prompts = RoutingReplay(model), prompt_batch()
    with replay.record() as routing:
        sequences, _ = generate(model, prompts)
    # One byte per index (4 experts fit uint8): top-2 of the base router + top-2 of PERFT-R, in each of 2 layers.
    assert routing.bytes_per_token() == NUM_LAYERS * (BASE_TOP_K + PERFT_TOP_K) == 8
    assert routing.nbytes() == routing.bytes_per_token() * sequences.shape[0] * (sequences.shape[1] - 1)
    assert all(value.dtype == torch.uint8 for value in routing.experts.values())


def test_replay_refuses_a_routing_of_other_sequences() -> None:
    model = perft_model("R")
    replay, prompts = RoutingReplay(model), prompt_batch()
    with replay.record() as routing:
        sequences, _ = generate(model, prompts)
    with pytest.raises(ValueError, match=r"holds 3.*routing.rows"), replay.replay(routing), torch.no_grad():
        score(model, sequences[:2], prompts["attention_mask"][:2])
    with replay.replay(routing.rows(slice(0, 2))), torch.no_grad():  # a micro-batch of the rollout replays
        score(model, sequences[:2], prompts["attention_mask"][:2])
    assert all(block.routing_replay is None for block in blocks(model).values()), "the switch stayed on"
