"""Every dispatch backend against an independent per-token loop, in outputs and in all gradients."""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from peft_perft import dispatch
from peft_perft.dispatch import always_on_experts, available_backends, routed_experts, select_backend
from peft_perft.dispatch.sorting import sort_pairs_by_expert, sum_in_token_order

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # relative to the largest value
ROUTINGS = ("top_k", "one_expert_set", "with_repeats")


def reference_routed(hidden, lora_A, lora_B, expert_index, expert_weight, activation):
    """out[t] = sum_k w[t, k] * B[e] @ act(A[e] @ h[t]), one token and one choice at a time."""
    rows = []
    for token in range(hidden.shape[0]):
        total = torch.zeros_like(hidden[token])
        for choice in range(expert_index.shape[1]):
            expert = int(expert_index[token, choice])
            down = lora_A[expert] @ hidden[token]
            if activation is not None:
                down = activation(down)
            total = total + expert_weight[token, choice] * (lora_B[expert] @ down)
        rows.append(total)
    return torch.stack(rows) if rows else hidden[:0] * 0


def reference_always_on(hidden, lora_A, lora_B, activation):
    """PERFT-D/S: every expert on every token."""
    total = torch.zeros_like(hidden)
    for expert in range(lora_A.shape[0]):
        down = hidden @ lora_A[expert].t()
        total = total + (activation(down) if activation is not None else down) @ lora_B[expert].t()
    return total


def make_routing(kind: str, tokens: int, experts: int, top_k: int, generator: torch.Generator):
    """Expert indices (T, K): distinct top-k, every token on the same K experts (the rest get none), or
    indices drawn with repeats; weights of both signs."""
    if kind == "top_k":
        index = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    elif kind == "one_expert_set":
        chosen = torch.randperm(experts, generator=generator)[:top_k]
        index = chosen.expand(tokens, top_k).clone()
    else:
        index = torch.randint(0, experts, (tokens, top_k), generator=generator)
    return index, torch.randn(tokens, top_k, generator=generator)


def gradients(output, inputs, seed_grad):
    """Gradients of <output, seed_grad> with unused inputs as zeros (e.g. no tokens at all)."""
    found = torch.autograd.grad(output, inputs, seed_grad, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found, strict=True)]


def assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert error <= TOLERANCE[dtype] * max(scale, 1.0), f"{what}: max error {error:.3g} at scale {scale:.3g}"


def supporting_backends(hidden, lora_A, expert_index) -> list[str]:
    names = []
    for name in [*available_backends(), "auto"]:
        try:
            select_backend(name, hidden, lora_A, expert_index)
        except RuntimeError:
            continue
        names.append(name)
    return names


def make_problem(tokens, hidden_dim, experts, top_k, rank, routing, generator):
    """A routed call's expert indices, its inputs [hidden, A, B, routing weights] and a seed gradient."""
    index, weight = make_routing(routing, tokens, experts, top_k, generator)
    values = [
        torch.randn(tokens, hidden_dim, generator=generator),
        torch.randn(experts, rank, hidden_dim, generator=generator) / hidden_dim**0.5,
        torch.randn(experts, hidden_dim, rank, generator=generator) / rank**0.5,
        weight,
    ]
    return index, values, torch.randn(tokens, hidden_dim, generator=generator)


def check_backends_against_reference(tokens, hidden_dim, experts, top_k, rank, dtype, silu, routing, device="cpu"):
    generator = torch.Generator().manual_seed(tokens * 1000 + experts * 10 + rank)
    activation = F.silu if silu else None
    index, values, seed_grad = make_problem(tokens, hidden_dim, experts, top_k, rank, routing, generator)
    # The reference sees exactly the values the backend sees (rounded to its dtype), computed in float64.
    exact = [v.to(dtype).double().requires_grad_() for v in values]
    expected = reference_routed(exact[0], exact[1], exact[2], index, exact[3], activation)
    expected_grads = gradients(expected, exact, seed_grad.double())
    inputs = [v.to(device=device, dtype=dtype).requires_grad_() for v in values]
    index = index.to(device)
    backends = supporting_backends(inputs[0], inputs[1], index)
    assert {"dense", "gather", "auto"} <= set(backends) or device != "cpu"
    for name in backends:
        with torch.no_grad():
            inference = routed_experts(inputs[0], inputs[1], inputs[2], index, inputs[3], activation, backend=name)
        assert_close(inference.cpu(), expected, dtype, f"{name} output without gradients")
        out = routed_experts(inputs[0], inputs[1], inputs[2], index, inputs[3], activation, backend=name)
        assert out.dtype == dtype
        assert_close(out.cpu(), expected, dtype, f"{name} output")
        found = gradients(out, inputs, seed_grad.to(device=device, dtype=dtype))
        for label, grad, want in zip(("hidden", "A", "B", "routing weight"), found, expected_grads, strict=True):
            assert_close(grad.cpu(), want, dtype, f"{name} gradient of {label}")
    return backends


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    tokens=st.integers(0, 24),
    hidden_dim=st.sampled_from([8, 12, 16, 32]),
    experts=st.integers(1, 10),
    top_k=st.integers(1, 4),
    rank=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    silu=st.booleans(),
    routing=st.sampled_from(ROUTINGS),
)
@example(tokens=0, hidden_dim=16, experts=4, top_k=2, rank=8, dtype=torch.float32, silu=True, routing="top_k")
@example(tokens=1, hidden_dim=16, experts=6, top_k=2, rank=4, dtype=torch.float32, silu=False, routing="top_k")
@example(tokens=1, hidden_dim=12, experts=5, top_k=3, rank=5, dtype=torch.bfloat16, silu=True, routing="with_repeats")
@example(tokens=9, hidden_dim=16, experts=5, top_k=1, rank=8, dtype=torch.bfloat16, silu=True, routing="one_expert_set")
@example(tokens=300, hidden_dim=16, experts=12, top_k=2, rank=6, dtype=torch.float32, silu=True, routing="top_k")
def test_every_backend_matches_the_per_token_loop(tokens, hidden_dim, experts, top_k, rank, dtype, silu, routing):
    top_k = min(top_k, experts) if routing != "with_repeats" else top_k
    check_backends_against_reference(tokens, hidden_dim, experts, top_k, rank, dtype, silu, routing)


def test_grouped_mm_matches_on_a_training_sized_call():
    """The sorted path itself (not a fallback) on many tokens, unused experts included."""
    backends = check_backends_against_reference(512, 32, 16, 2, 8, torch.float32, True, "top_k")
    assert "grouped_mm" in backends


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "rank", "training", "expected"),
    [
        (1, 16, 4, 16, False, "gather"),  # PERFT-R decode step
        (1, 64, 8, 16, False, "gather"),  # PERFT-E decode step
        (1024, 16, 4, 16, True, "dense"),  # PERFT-R training step: 4x the selected work is still cheaper
        (1024, 64, 8, 16, True, "dense"),  # PERFT-E, r=16: dense and sorted within 15%, dense ahead
        (1024, 32, 2, 32, True, "grouped_mm"),  # N * r / K = 512: dense would do 16x the selected work
        (64, 32, 2, 32, True, "grouped_mm"),
        (16, 32, 2, 32, True, "dense"),  # too few tokens to amortise the sort
        (1024, 32, 2, 32, False, "grouped_mm"),
        (1024, 64, 8, 16, False, "dense"),  # forward alone: sorting's row traffic weighs more
    ],
)
def test_auto_follows_the_measured_cpu_crossovers(tokens, experts, top_k, rank, training, expected):
    hidden, lora_A = torch.zeros(tokens, 512), torch.zeros(experts, rank, 512, requires_grad=training)
    assert select_backend("auto", hidden, lora_A, torch.zeros(tokens, top_k, dtype=torch.long)).name == expected


def test_auto_remembers_its_choice_per_grad_mode_and_forgets_it_when_backends_change(monkeypatch):
    """The choice is cached per call signature (a decode step repeats it every token); the signature includes
    whether gradients flow, whose cost model differs, and registering a backend clears the cache."""
    hidden, lora_A = torch.zeros(64, 512), torch.zeros(64, 16, 512, requires_grad=True)
    index = torch.zeros(64, 4, dtype=torch.long)
    with torch.no_grad():
        assert select_backend("auto", hidden, lora_A, index).name == "dense"
    assert select_backend("auto", hidden, lora_A, index).name == "grouped_mm"
    with torch.no_grad():
        assert select_backend("auto", hidden, lora_A, index).name == "dense"
    for registry in ("_BACKENDS", "_BY_PRIORITY", "_AUTO_CHOICES"):
        monkeypatch.setattr(dispatch, registry, copy.copy(getattr(dispatch, registry)))
    dispatch.register_backend("always", dispatch._BACKENDS["dense"].routed, lambda *args: True, priority=100)
    assert select_backend("auto", hidden, lora_A, index).name == "always"
    monkeypatch.setattr(dispatch, "_MAX_REMEMBERED", 3)
    for tokens in range(1, 10):  # a new token count per call, as in training on unpadded batches
        select_backend("auto", hidden[:tokens], lora_A, index[:tokens])
        assert len(dispatch._AUTO_CHOICES) <= 3


def test_grouped_mm_pads_unaligned_ranks_and_refuses_unaligned_hidden_sizes():
    """r = 5 in fp32 breaks grouped_mm's 16-byte stride rule and is padded; D = 12 in bf16 cannot be padded."""
    assert "grouped_mm" in check_backends_against_reference(40, 16, 6, 2, 5, torch.float32, True, "top_k")
    hidden, lora_A = torch.zeros(40, 12, dtype=torch.bfloat16), torch.zeros(6, 8, 12, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="'grouped_mm' cannot run"):
        select_backend("grouped_mm", hidden, lora_A, torch.zeros(40, 2, dtype=torch.long))


def test_decode_step_runs_no_sort():
    """One token with the KV cache: auto must not pay for sorting, histogram or grouped GEMMs."""
    hidden, lora_A, lora_B = torch.randn(1, 64), torch.randn(16, 8, 64), torch.randn(16, 64, 8)
    index, weight = torch.tensor([[3, 7, 11, 2]]), torch.rand(1, 4)
    with torch.no_grad(), torch.profiler.profile() as profile:
        routed_experts(hidden, lora_A, lora_B, index, weight, F.silu)
    names = {event.name for event in profile.events()}
    assert not {"aten::sort", "aten::argsort", "aten::_grouped_mm", "aten::searchsorted"} & names
    assert select_backend("auto", hidden, lora_A, index).name in {"gather", "dense"}


def test_token_order_sum_used_off_cpu_adds_each_pair_into_its_token():
    """The deterministic reduction the sorted backends use on GPUs, checked here on CPU tensors."""
    generator = torch.Generator().manual_seed(3)
    index, _ = make_routing("with_repeats", 13, 5, 3, generator)
    pairs = sort_pairs_by_expert(index, 5)
    pair_rows = torch.randn(39, 8, generator=generator)
    expected = torch.zeros(13, 8)
    for row, token in zip(pair_rows, pairs.token.tolist(), strict=True):
        expected[token] += row
    assert torch.allclose(sum_in_token_order(pair_rows, pairs, 13), expected, atol=1e-6)
    assert pairs.offsets.dtype == torch.int32 and int(pairs.offsets[-1]) == 39
    assert torch.equal(index.reshape(-1)[pairs.order], index.reshape(-1).sort(stable=True).values)


def test_forced_backends_fail_clearly_where_they_cannot_run():
    hidden, lora_A, index = torch.zeros(4, 16), torch.zeros(4, 8, 16), torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="Unknown dispatch backend 'nope'"):
        select_backend("nope", hidden, lora_A, index)
    with pytest.raises(RuntimeError, match="'megablocks' cannot run on cpu"):
        select_backend("megablocks", hidden, lora_A, index)


@pytest.mark.parametrize(("tokens", "backend"), [(300, "grouped_mm"), (1, "gather")])
def test_compiled_call_takes_a_routed_backend_and_matches_the_loop(tokens: int, backend: str):
    """Under torch.compile (one graph) ``auto`` takes ``grouped_mm`` (through the ``peft_perft::grouped_mm``
    operator), or ``gather`` for a decode step: never ``dense``, whose FLOPs grow with all N experts. Outputs and
    all gradients equal the per-token loop."""
    generator = torch.Generator().manual_seed(0)
    hidden, lora_A, lora_B = (
        torch.randn(tokens, 16, generator=generator),
        torch.randn(12, 8, 16, generator=generator),
        torch.randn(12, 16, 8, generator=generator),
    )
    index, weight = make_routing("top_k", tokens, 12, 2, generator)
    chosen = []

    def routed(*inputs):
        chosen.append(select_backend("auto", inputs[0], inputs[1], inputs[3]).name)
        return routed_experts(*inputs, F.silu)

    inputs = [value.clone().requires_grad_() for value in (hidden, lora_A, lora_B)] + [index]
    inputs.append(weight.clone().requires_grad_())
    out = torch.compile(routed, backend="aot_eager", fullgraph=True)(*inputs)
    assert chosen == [backend]
    seed_grad = torch.randn(out.shape, generator=generator)
    reference_inputs = [v.double().requires_grad_() for v in (hidden, lora_A, lora_B)]
    reference_inputs += [index, weight.double().requires_grad_()]
    expected = reference_routed(*reference_inputs, F.silu)
    assert_close(out, expected, torch.float32, "compiled output")
    differentiable = [v for v in inputs if v.dtype.is_floating_point]
    expected_differentiable = [v for v in reference_inputs if v.dtype.is_floating_point]
    for got, want in zip(
        gradients(out, differentiable, seed_grad),
        gradients(expected, expected_differentiable, seed_grad.double()),
        strict=True,
    ):
        assert_close(got, want, torch.float32, "compiled gradient")


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    tokens=st.integers(0, 12),
    experts=st.integers(1, 6),
    rank=st.integers(1, 8),
    silu=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_always_on_experts_is_the_sum_of_all_experts(tokens, experts, rank, silu, dtype):
    generator = torch.Generator().manual_seed(tokens + 10 * experts + 100 * rank)
    activation = F.silu if silu else None
    values = [
        torch.randn(tokens, 16, generator=generator),
        torch.randn(experts, rank, 16, generator=generator) / 4,
        torch.randn(experts, 16, rank, generator=generator) / rank**0.5,
    ]
    seed_grad = torch.randn(tokens, 16, generator=generator)
    exact = [v.to(dtype).double().requires_grad_() for v in values]
    expected = reference_always_on(*exact, activation)
    expected_grads = gradients(expected, exact, seed_grad.double())
    inputs = [v.to(dtype).requires_grad_() for v in values]
    out = always_on_experts(*inputs, activation)
    assert_close(out, expected, dtype, "always-on output")
    for grad, want in zip(gradients(out, inputs, seed_grad.to(dtype)), expected_grads, strict=True):
        assert_close(grad, want, dtype, "always-on gradient")


CUDA_BACKENDS_REASON = "needs a CUDA device (none here)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_BACKENDS_REASON)
@pytest.mark.parametrize("tokens", [0, 1, 7, 700])
def test_cuda_backends_match_the_per_token_loop(tokens):
    backends = check_backends_against_reference(tokens, 64, 16, 4, 16, torch.bfloat16, True, "top_k", device="cuda")
    assert "grouped_mm" in backends or tokens == 0 or torch.cuda.get_device_capability() < (8, 0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("megablocks") is None,
    reason="needs CUDA and MegaBlocks (see the MegaBlocks install steps in docs/performance.md); absent here",
)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_megablocks_matches_the_per_token_loop(routing):
    backends = check_backends_against_reference(257, 64, 16, 4, 12, torch.bfloat16, True, routing, device="cuda")
    assert "megablocks" in backends


def external_calls(inductor_code: str) -> list[str]:
    """The external kernels (ATen GEMMs, fallbacks, custom operators) that Inductor's wrapper calls, in order: what
    a compiled call costs beside its generated loops."""
    wrapper = inductor_code.split("def call(", 1)[1]
    return re.findall(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", wrapper)


@pytest.mark.parametrize(("silu", "repeated"), [(True, False), (False, True)])
def test_inductor_decode_step_reads_the_experts_in_place_and_matches_the_loop(silu: bool, repeated: bool):
    """A compiled decode step (one token, no routing-weight gradient) through ``gather``: Inductor generates it
    whole, with no external kernel (no GEMM, no gathered copy of A), and it equals the per-token loop in output and
    in the gradients of the hidden state and of A and B (an expert chosen twice gets both pairs' gradients)."""
    from torch._inductor.utils import run_and_get_code

    generator = torch.Generator().manual_seed(5)
    activation = F.silu if silu else None
    index, values, seed_grad = make_problem(1, 64, 16, 4, 8, "top_k", generator)
    if repeated:
        index = torch.tensor([[3, 9, 3, 12]])
    hidden, lora_A, lora_B, weight = (value.clone() for value in values)
    leaves = [tensor.requires_grad_() for tensor in (hidden, lora_A, lora_B)]

    def routed(hidden, lora_A, lora_B):
        return routed_experts(hidden, lora_A, lora_B, index, weight, activation, backend="gather")

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(routed, fullgraph=True), *leaves)
    assert external_calls(codes[0]) == [], codes[0]
    exact = [value.double().requires_grad_() for value in values[:3]]
    expected = reference_routed(*exact, index, weight.double(), activation)
    assert_close(out, expected, torch.float32, "compiled decode output")
    expected_gradients = gradients(expected, exact, seed_grad.double())
    for got, want in zip(gradients(out, leaves, seed_grad), expected_gradients, strict=True):
        assert_close(got, want, torch.float32, "compiled decode gradient")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(experts=st.integers(1, 64), data=st.data())
def test_top_k_of_is_torch_topk(experts: int, data: st.DataObject):
    """The compiled decode step's top-k (rounds of max-and-mask) selects what ``torch.topk`` selects, in the
    same order, on distinct values, and passes the same gradient to them."""
    from peft_perft.terms import top_k_of

    top_k = data.draw(st.integers(1, experts))
    generator = torch.Generator().manual_seed(experts * 100 + top_k)
    values = torch.randperm(experts * 4, generator=generator)[:experts].float().view(1, -1) / 7 - 3
    values.requires_grad_()
    got_values, got_index = top_k_of(values, top_k)
    want_values, want_index = values.topk(top_k, dim=-1)
    assert torch.equal(got_index, want_index) and torch.equal(got_values, want_values)
    seed = torch.randn(1, top_k, generator=generator)
    (got_grad,) = torch.autograd.grad(got_values, values, seed)
    (want_grad,) = torch.autograd.grad(want_values, values, seed)
    assert torch.equal(got_grad, want_grad)
