"""Property-based tests: config parsing never fails in an unexpected way; the forward pass holds on random shapes."""

from __future__ import annotations

import json

import torch
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, get_peft_model

from peft_perft import PerftConfig, PerftMoeBlock

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(-2.0, 3.0),
    st.just(float("nan")),
    st.sampled_from(["R", "E", "D", "S", "r", "x", "lora", "parallel_adapter", "auto", ""]),
)
FIELDS = [
    "variant",
    "r",
    "lora_alpha",
    "lora_dropout",
    "adapter_type",
    "num_experts",
    "top_k",
    "normalize_top_k",
    "router_aux_loss_coef",
    "router_init_std",
]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=6))
def test_config_either_validates_or_names_the_bad_field(fields: dict) -> None:
    try:
        config = PerftConfig(**fields)
    except ValueError as error:
        assert "PerftConfig." in str(error) and any(name in str(error) for name in fields)
        return
    assert config.variant in ("R", "E", "D", "S") and config.r > 0 and 0 <= config.lora_dropout < 1
    if config.variant == "R":
        assert 1 <= config.resolved_top_k() <= config.resolved_num_experts(0)
    round_trip = PeftConfig.from_peft_type(**json.loads(json.dumps(config.to_dict())))
    assert isinstance(round_trip, PerftConfig) and round_trip.to_dict() == config.to_dict()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from("REDS"),
    family=st.sampled_from(["olmoe", "mixtral"]),
    base_experts=st.integers(2, 6),
    adapter_experts=st.integers(1, 5),
    rank=st.integers(1, 6),
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    data=st.data(),
)
def test_forward_on_random_shapes_and_routing(
    variant: str,
    family: str,
    base_experts: int,
    adapter_experts: int,
    rank: int,
    batch: int,
    length: int,
    data: st.DataObject,
) -> None:
    base_top_k = data.draw(st.integers(1, base_experts))
    expert_key = "num_experts" if family == "olmoe" else "num_local_experts"
    overrides = {expert_key: base_experts, "num_experts_per_tok": base_top_k}
    settings_ = {"variant": variant, "r": rank}
    if variant in "RD":
        settings_["num_experts"] = adapter_experts
    if variant == "R":
        settings_["top_k"] = data.draw(st.integers(1, adapter_experts))
    tokens = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(batch * 10 + length))
    expected = build_tiny(family, **overrides)(tokens).logits
    model = get_peft_model(build_tiny(family, **overrides), PerftConfig(**settings_))
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    for block in model.modules():
        if isinstance(block, PerftMoeBlock):
            torch.nn.init.normal_(block.perft_B["default"], std=0.1)
    adapted = model(tokens).logits.square().mean()
    adapted.backward()
    assert torch.isfinite(adapted)
    grads = [p.grad for name, p in model.named_parameters() if ".perft_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
