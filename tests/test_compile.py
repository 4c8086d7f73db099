"""``torch.compile`` on PERFT models: a training step and ``generate`` compile as one graph (``fullgraph=True``, so
any graph break, in PERFT's code or elsewhere, fails), take a routed path (``grouped_mm`` through the
``peft_perft::grouped_mm`` operator, or ``gather`` for a decode step; never ``dense``, which pays for all N
experts), read nothing back to the host, and give the eager results.

The backends are Dynamo's ``aot_eager`` (training: Dynamo and AOTAutograd trace forward and backward, and the
traced ATen graphs are inspected) and ``eager`` (generate), which check the tracing without paying for Inductor's
C++ code generation on every test; one forward per routed variant, one training step and one ``reduce-overhead``
decode go through Inductor itself. The CUDA-graph capture of the decode step needs a GPU (its test says so when
skipped; scripts/gpu_session.sh runs it). BENCHMARKS.md reports Inductor-compiled timings, made with
benchmarks/olmoe_step.py --compile."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import build_tiny
from peft import get_peft_model
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch._inductor.utils import run_and_get_code

from peft_perft import PerftConfig

VARIANTS = ["R", "E", "D", "S"]
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
"""ATen ops that move a value from a tensor to the host (``.item()``, ``.tolist()``) or size a result by the data."""
GROUPED = "peft_perft.grouped_mm.default"
DENSE_GATE = "aten.scatter_add.default"
"""The dense backend's routing-weight scatter: absent where the routed adapters take a grouped path."""


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perft_model(variant: str, dtype: torch.dtype = torch.float32, **build) -> torch.nn.Module:
    sizes = {"num_experts": 4, "top_k": 2} if variant == "R" else {}
    config = PerftConfig(variant=variant, r=4, init_weights=False, **sizes)
    base = build_tiny(**build).to(dtype)
    return get_peft_model(base, config, autocast_adapter_dtype=dtype == torch.float32)


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _aten_ops(backend: AotEagerAndRecordGraphs) -> Counter:
    """Every op called in the traced forward and backward graphs, by name."""
    graphs = backend.fw_graphs + backend.bw_graphs
    return Counter(str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function")


def _static_shapes(backend: AotEagerAndRecordGraphs) -> bool:
    """Whether every value in the traced graphs has a shape known at trace time (none sized by the data)."""
    graphs = backend.fw_graphs + backend.bw_graphs
    values = [node.meta.get("val") for graph in graphs for node in graph.graph.nodes]
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    return all(isinstance(size, int) for tensor in tensors for size in tensor.shape)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_training_step_is_one_graph_on_a_routed_path_and_matches_eager(variant: str, tokens: torch.Tensor):
    model = _perft_model(variant).train()
    eager = copy.deepcopy(model)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(input_ids=tokens, labels=tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert not torch._dynamo.config.capture_scalar_outputs and not torch._dynamo.config.capture_dynamic_output_shape_ops
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    loss = compiled(input_ids=tokens, labels=tokens).loss
    loss.backward()
    expected = eager(input_ids=tokens, labels=tokens).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    ops = _aten_ops(recorder)
    assert not HOST_READS & set(ops) and _static_shapes(recorder)
    if variant in ("R", "E"):
        # 2 layers x 2 projections forward, their gradients backward: all grouped, none dense.
        assert ops[GROUPED] >= 8 and ops[DENSE_GATE] == 0, ops
    gradients, expected_gradients = _gradients(model), _gradients(eager)
    assert gradients.keys() == expected_gradients.keys() and any(".perft_router." in n for n in gradients) == (
        variant == "R"
    )
    assert any(".perft_A." in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-6)


def _refuse_host_read(*args, **kwargs):
    raise AssertionError("a value was read back to the host inside the compiled step")


@pytest.mark.parametrize(
    ("variant", "dtype", "experts_implementation"),
    [(variant, torch.bfloat16, "grouped_mm") for variant in VARIANTS] + [("E", torch.float32, "batched_mm")],
    ids=[f"{variant}-bf16" for variant in VARIANTS] + ["E-fp32-base-batched_mm"],
)
def test_compiled_step_reads_nothing_back_to_the_host(
    variant: str, dtype: torch.dtype, experts_implementation: str, tokens: torch.Tensor
):
    """No ``.item()``, ``.tolist()`` or ``nonzero`` runs while the compiled step runs, opaque operators included.

    In bf16 the base experts' ``grouped_mm`` is torch's own kernel; in fp32 it is Transformers' fallback operator,
    which reads its group ends to the host (the base model's, not PERFT's), so fp32 runs here with the base on
    ``batched_mm``, where PERFT-E's term goes through the ``grouped_mm`` backend after the experts call."""
    model = _perft_model(variant, dtype, experts_implementation=experts_implementation).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(input_ids=tokens, labels=tokens).loss.backward()  # compiles
    with (
        mock.patch.object(torch.Tensor, "item", _refuse_host_read),
        mock.patch.object(torch.Tensor, "tolist", _refuse_host_read),
        mock.patch.object(torch.Tensor, "nonzero", _refuse_host_read),
    ):
        loss = compiled(input_ids=tokens, labels=tokens).loss
        loss.backward()
    assert torch.isfinite(loss)


def test_inductor_compiled_training_step_matches_eager(tokens: torch.Tensor):
    """Inductor generates the forward and the backward around PERFT-R's grouped operator."""
    model = _perft_model("R", num_hidden_layers=1).train()
    eager = copy.deepcopy(model)
    loss = torch.compile(model, fullgraph=True)(input_ids=tokens, labels=tokens).loss
    loss.backward()
    expected = eager(input_ids=tokens, labels=tokens).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    expected_gradients = _gradients(eager)
    for name, gradient in _gradients(model).items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-3, atol=1e-5)


def _generate_settings() -> dict:
    return {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}


@pytest.mark.parametrize("variant", ["E", "R"])
def test_compiled_generate_is_one_graph_and_matches_eager(variant: str, tokens: torch.Tensor):
    """The decode step (static KV cache, so one graph serves every position) with a routed adapter."""
    model = _perft_model(variant).eval()
    eager = copy.deepcopy(model)
    base = model.get_base_model()
    base.forward = torch.compile(base.forward, fullgraph=True, backend="eager")
    generated = model.generate(input_ids=tokens[:1], **_generate_settings())
    expected = eager.generate(input_ids=tokens[:1], **_generate_settings())
    assert torch.equal(generated, expected)
    with eager.disable_adapter():
        base_only = eager.generate(input_ids=tokens[:1], **_generate_settings())
    assert not torch.equal(expected, base_only), "the adapter must change the generated tokens"


def test_reduce_overhead_generate_matches_eager(tokens: torch.Tensor):
    """``mode="reduce-overhead"`` (Inductor; CUDA graphs where there is a GPU, none on CPU) on the static-cache
    decode step of PERFT-E: one graph, the eager tokens."""
    model = _perft_model("E", num_hidden_layers=1).eval()
    eager = copy.deepcopy(model)
    base = model.get_base_model()
    base.forward = torch.compile(base.forward, fullgraph=True, mode="reduce-overhead")
    generated = model.generate(input_ids=tokens[:1], **_generate_settings())
    assert torch.equal(generated, eager.generate(input_ids=tokens[:1], **_generate_settings()))


@pytest.mark.parametrize("variant", ["E", "R"])
def test_inductor_compiled_forward_matches_eager(variant: str, tokens: torch.Tensor):
    """Inductor itself (C++ code generation), not only the tracing: its pattern matcher once turned PERFT's scaled
    addition after a matmul into an addmm that dropped the scaling, which the tracing-only backends cannot show."""
    model = _perft_model(variant, num_hidden_layers=1).eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=tokens).logits
        with model.disable_adapter():
            base_only = model(input_ids=tokens).logits
    assert (expected - base_only).abs().max() > 0.1, "the adapter must change the logits"
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-5)


CUDA_GRAPHS_REASON = "CUDA-graph capture of the decode step needs a CUDA GPU (scripts/gpu_session.sh runs this test)"


def _cuda_graph_decode(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """Generate twice (the second replays what the first recorded) with the transformer's forward compiled under
    reduce-overhead: the tokens, how many times Inductor skipped CUDA graphs, and whether it recorded any."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.forward = torch.compile(base.forward, fullgraph=True, mode="reduce-overhead")
    for _ in range(2):
        generated = model.generate(input_ids=prompt, **_generate_settings())
    manager = torch._inductor.cudagraph_trees.get_manager(prompt.device.index, create_if_none_exists=False)
    recorded = manager is not None and any(manager.roots.values())
    return generated, counters["inductor"]["cudagraph_skips"], recorded


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_GRAPHS_REASON)
@pytest.mark.parametrize("variant", ["E", "R"])
def test_reduce_overhead_decode_captures_the_perft_path_in_cuda_graphs(variant: str, tokens: torch.Tensor):
    """bf16 on the GPU: the PERFT model's decode is recorded in CUDA graphs, Inductor skips them no more often than
    for the frozen model under the same calls (a skip comes from a CPU op, a host read or a mutated input in the
    graph), and the replayed steps give the eager tokens."""
    prompt = tokens[:1].cuda()
    frozen = build_tiny().to(device="cuda", dtype=torch.bfloat16)
    _, frozen_skips, _ = _cuda_graph_decode(frozen, prompt)
    model = _perft_model(variant, torch.bfloat16).cuda().eval()
    eager = copy.deepcopy(model)
    generated, skips, recorded = _cuda_graph_decode(model, prompt)
    assert recorded, "no CUDA graph was recorded"
    assert skips <= frozen_skips, f"Inductor skipped CUDA graphs {skips} times for PERFT, {frozen_skips} for frozen"
    assert torch.equal(generated, eager.generate(input_ids=prompt, **_generate_settings()))


def _decode_step_kernels(model: torch.nn.Module, token: torch.Tensor) -> tuple[Counter, int]:
    """What Inductor's wrapper calls for one token's forward (a decode step's shapes): its external kernels by
    name, and how many of its own generated loops."""
    torch._dynamo.reset()
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(model, fullgraph=True), input_ids=token)
    wrapper = codes[-1].split("def call(", 1)[1]
    external = Counter(re.findall(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", wrapper))
    return external, len(re.findall(r"^\s+cpp_fused_\w+\(", wrapper, re.MULTILINE))


@pytest.mark.parametrize("variant", ["R", "E"])
def test_inductor_decode_step_adds_no_kernel_call_to_the_frozen_model(variant: str, tokens: torch.Tensor):
    """One token through a compiled PERFT-R or PERFT-E model calls exactly the external kernels and generated loops
    the frozen model calls: PERFT's router, top-k, gathers and products are generated into the frozen model's own
    loops (``gather``'s compiled decode form, ``terms.router_product``, ``terms.top_k_of``), which is what a CPU,
    where nothing replays a step's kernels as CUDA graphs do, pays per kernel on every token."""
    model = _perft_model(variant, num_hidden_layers=1).eval()
    frozen = build_tiny(num_hidden_layers=1)
    assert _decode_step_kernels(model, tokens[:1, :1]) == _decode_step_kernels(frozen, tokens[:1, :1])


FALLBACK_BACKWARD = "transformers.grouped_mm_fallback_backward.default"
"""Transformers' grouped GEMM backward for compiled non-bf16 experts: it computes every expert weight's gradient."""


def _backward_on_embeddings(
    model: torch.nn.Module, tokens: torch.Tensor, backend: AotEagerAndRecordGraphs | None = None, **labels
) -> tuple[Any, torch.Tensor]:
    """The model's output on the tokens' embeddings (compiled with ``backend``, else eager) after the backward of
    its loss (with labels) or of its logits' sum, and the embeddings' gradient."""
    embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_()
    forward = model if backend is None else torch.compile(model, fullgraph=True, backend=backend)
    output = forward(inputs_embeds=embeddings, **labels)
    (output.loss if labels else output.logits.sum()).backward()
    return output, embeddings.grad


def test_compiled_perft_e_computes_no_gradient_for_the_frozen_expert_weights(tokens: torch.Tensor):
    """Compiled in fp32, the frozen model's experts go through Transformers' fallback operator, which computes a
    gradient for every expert weight and drops it; PERFT-E's fused experts call runs the frozen projections through
    torch's grouped kernel instead, whose backward computes only the gradients autograd asks for."""
    frozen_recorder = AotEagerAndRecordGraphs()
    _backward_on_embeddings(build_tiny().requires_grad_(False).train(), tokens, frozen_recorder)
    assert _aten_ops(frozen_recorder)[FALLBACK_BACKWARD] > 0

    model = _perft_model("E").train()
    eager = copy.deepcopy(model)
    recorder = AotEagerAndRecordGraphs()
    output, embeddings_grad = _backward_on_embeddings(model, tokens, recorder, labels=tokens)
    ops = _aten_ops(recorder)
    # Per layer (2): forward 2 frozen + 2 adapter projections; backward the frozen projections' input gradients (2)
    # and the adapter's input and weight gradients (4). A frozen weight's gradient would add 2 per layer.
    assert ops[FALLBACK_BACKWARD] == 0 and ops[GROUPED] == 2 * (4 + 6), ops
    expected, expected_embeddings_grad = _backward_on_embeddings(eager, tokens, labels=tokens)
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(embeddings_grad, expected_embeddings_grad, rtol=1e-4, atol=1e-6)
    expected_gradients = _gradients(eager)
    for name, gradient in _gradients(model).items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-6)


def test_the_benchmarks_lean_frozen_experts_give_the_frozen_model_the_same_backward(
    tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
):
    """``olmoe_step.py --lean-frozen-experts``: the compiled frozen model's experts drop the weight gradients of
    Transformers' fallback, as PERFT-E's fused call does, and compute the same logits and input gradients."""
    from transformers.integrations import moe as transformers_moe

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import olmoe_step

    monkeypatch.setattr(transformers_moe, "_grouped_mm", transformers_moe._grouped_mm)  # restored afterwards
    olmoe_step.lean_frozen_experts()
    model = build_tiny().requires_grad_(False).train()
    eager = copy.deepcopy(model)
    recorder = AotEagerAndRecordGraphs()
    output, embeddings_grad = _backward_on_embeddings(model, tokens, recorder)
    ops = _aten_ops(recorder)
    # Per layer (2): the two projections forward and their input gradients backward, nothing else.
    assert ops[FALLBACK_BACKWARD] == 0 and ops[GROUPED] == 2 * (2 + 2), ops
    expected, expected_embeddings_grad = _backward_on_embeddings(eager, tokens)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeddings_grad, expected_embeddings_grad, rtol=1e-4, atol=1e-5)


def test_the_benchmarks_guard_diagnostic_drops_the_guards_on_torch_nn_modules(monkeypatch: pytest.MonkeyPatch):
    """``olmoe_step.py --skip-inbuilt-module-guards`` compiles with Dynamo's filter: switching an inbuilt module
    (a Dropout) to evaluation no longer recompiles, as it does with the default settings; without ``--compile`` the
    flag is refused."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import olmoe_step

    def compilations(flags: list[str]) -> int:
        monkeypatch.setattr("sys.argv", ["olmoe_step.py", "--compile", *flags])
        torch._dynamo.reset()
        module, counter = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)), CompileCounter()
        compiled = torch.compile(module, backend=counter, **olmoe_step._compile_settings(olmoe_step.parse_arguments()))
        compiled(torch.ones(2, 4))
        module.eval()
        compiled(torch.ones(2, 4))
        return counter.frame_count

    assert compilations([]) == 2 and compilations(["--skip-inbuilt-module-guards"]) == 1
    monkeypatch.setattr("sys.argv", ["olmoe_step.py", "--skip-inbuilt-module-guards"])
    with pytest.raises(SystemExit):
        olmoe_step.parse_arguments()
