"""The ``megablocks`` backend's call sequence, shapes, padding and gradients, on CPU, through a pure-PyTorch
stand-in for the MegaBlocks functions it calls (tests/megablocks_standin.py).

First the stand-in is checked against the references of MegaBlocks' own test suite (``tests/ops`` of
databricks/megablocks, re-expressed here: torch.sort for ``sort``, per-row torch.histc for ``histogram``,
torch.cumsum for ``inclusive_cumsum``, per-pair loops for ``gather`` and ``scatter``) and a per-expert loop for
grouped_gemm's ``gmm``. Then the backend runs on it against the per-token loop of tests/test_dispatch.py. The real
CUDA kernels are exercised by test_dispatch.py's CUDA tests, which skip without a GPU and MegaBlocks.
"""

from __future__ import annotations

import megablocks_standin as standin
import pytest
import torch
import torch.nn.functional as F
from test_dispatch import ROUTINGS, assert_close, gradients, make_problem, reference_routed

from peft_perft.dispatch import megablocks_backend


@pytest.fixture
def log(monkeypatch) -> standin.CallLog:
    """The backend finds the stand-in instead of MegaBlocks; the returned log records its calls."""
    monkeypatch.setattr(megablocks_backend, "_megablocks", standin.modules)
    monkeypatch.setattr(standin, "LOG", standin.CallLog())
    return standin.LOG


def _routing(tokens: int, experts: int, top_k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    flat_experts = torch.randint(0, experts, (tokens * top_k,), generator=generator).int()
    bin_ids, indices = standin.sort(flat_experts, max(1, (experts - 1).bit_length()))
    bins = standin.inclusive_cumsum(standin.histogram(flat_experts, experts), 0).view(-1)
    return flat_experts, bin_ids, indices, bins


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize(("size", "max_val"), [(32, 128), (1024, 128), (1024, 2**15 - 1)])
def test_sort_agrees_with_torch_sort(size: int, max_val: int, dtype: torch.dtype):
    x = torch.randint(0, max_val, (size,), generator=torch.Generator().manual_seed(size)).to(dtype)
    values, indices = standin.sort(x, max(1, (max_val - 1).bit_length()))
    assert torch.equal(values, torch.sort(x).values) and indices.dtype == dtype
    assert torch.equal(x[indices.long()], values)
    with pytest.raises(ValueError, match="end_bit"):
        standin.sort(x.clamp(min=4), 2)


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("max_val", [1, 128, 1024])
def test_histogram_agrees_with_histc_per_row(rows: int, max_val: int):
    x = torch.randint(0, max_val, (rows, 1024), generator=torch.Generator().manual_seed(rows))
    expected = torch.stack([torch.histc(row.float(), max_val, 0, max_val - 1) for row in x])
    out = standin.histogram(x.int(), max_val)
    assert out.dtype == torch.int32 and torch.equal(out, expected.int())
    assert torch.equal(standin.histogram(x[0].int(), max_val), expected[0].int())


def test_inclusive_cumsum_agrees_with_cumsum_and_squeezes_one_dimensional_input():
    x = torch.randint(0, 2, (4, 1024), generator=torch.Generator().manual_seed(0))
    assert torch.equal(standin.inclusive_cumsum(x, 1), torch.cumsum(x, dim=1))
    assert torch.equal(standin.inclusive_cumsum(x[0], 0), torch.cumsum(x[0], dim=0))
    assert standin.inclusive_cumsum(torch.tensor([5], dtype=torch.int32), 0).dim() == 0


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(4, 2, 1), (4, 2, 2), (1024, 4, 2), (64, 64, 8)])
def test_gather_and_scatter_agree_with_per_pair_loops(tokens: int, experts: int, top_k: int):
    _, bin_ids, indices, bins = _routing(tokens, experts, top_k)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens * top_k, generator=generator, dtype=torch.float64, requires_grad=True)

    gathered = standin.gather(x, indices, bin_ids, bins, top_k)
    expected_gathered = torch.stack([x[int(indices[i]) // top_k] for i in range(tokens * top_k)])
    assert torch.equal(gathered, expected_gathered)

    rows = torch.randn(tokens * top_k, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    out = standin.scatter(rows, indices, bin_ids, weights, bins, top_k)
    expected = [torch.zeros(8, dtype=torch.float64) for _ in range(tokens)]
    for i in range(tokens * top_k):
        position = int(indices[i])
        expected[position // top_k] = expected[position // top_k] + weights[position] * rows[i]
    expected = torch.stack(expected)
    torch.testing.assert_close(out, expected)
    seed = torch.randn(tokens, 8, generator=generator, dtype=torch.float64)
    for got, want in zip(
        gradients(out, [rows, weights], seed), gradients(expected, [rows, weights], seed), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_gmm_agrees_with_a_per_expert_loop_and_keeps_the_kernel_rules():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 0, 5, 1])
    a = torch.randn(9, 16, generator=generator).bfloat16()
    b = torch.randn(4, 8, 16, generator=generator).bfloat16()
    out = standin.gmm(a, b, sizes, trans_b=True)
    starts = [0, 3, 3, 8]
    for expert, (start, size) in enumerate(zip(starts, sizes.tolist(), strict=True)):
        torch.testing.assert_close(out[start : start + size], a[start : start + size] @ b[expert].t())
    with pytest.raises(ValueError, match="bf16"):
        standin.gmm(a.float(), b.float(), sizes, trans_b=True)
    with pytest.raises(ValueError, match="host"):
        standin.gmm(a, b, sizes.int(), trans_b=True)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("tokens", [1, 257])
def test_backend_matches_the_per_token_loop_through_the_standin(log: standin.CallLog, routing: str, tokens: int):
    """Output and every gradient (hidden, A, B, routing weights) in bf16; rank 12 padded to 16 for gmm."""
    experts, top_k, rank, hidden_dim = 16, 4, 12, 64
    generator = torch.Generator().manual_seed(tokens)
    index, values, seed_grad = make_problem(tokens, hidden_dim, experts, top_k, rank, routing, generator)
    exact = [v.bfloat16().double().requires_grad_() for v in values]
    expected = reference_routed(exact[0], exact[1], exact[2], index, exact[3], F.silu)
    inputs = [v.bfloat16().requires_grad_() for v in values]
    out = megablocks_backend.megablocks_routed(inputs[0], inputs[1], inputs[2], index, inputs[3], F.silu)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16, "megablocks output")
    found = gradients(out, inputs, seed_grad.bfloat16())
    wanted = gradients(expected, exact, seed_grad.double())
    for label, grad, want in zip(("hidden", "A", "B", "routing weight"), found, wanted, strict=True):
        assert_close(grad, want, torch.bfloat16, f"megablocks gradient of {label}")

    assert log.names == ["sort", "histogram", "inclusive_cumsum", "gather", "gmm", "gmm", "scatter"]
    details = dict(log.calls)
    assert details["sort"] == {"end_bit": 4, "dtype": torch.int32, "size": tokens * top_k}
    assert details["histogram"]["max_val"] == experts
    assert details["gather"] == {"rows": tokens, "top_k": top_k, "contiguous": True}
    gmm_calls = [call for name, call in log.calls if name == "gmm"]
    assert gmm_calls[0] == {
        "a_shape": (tokens * top_k, hidden_dim),
        "b_shape": (experts, 16, hidden_dim),
        "trans_b": True,
    }
    assert gmm_calls[1] == {"a_shape": (tokens * top_k, 16), "b_shape": (experts, hidden_dim, 16), "trans_b": True}
    assert details["scatter"]["top_k"] == top_k and details["scatter"]["weights_dtype"] == torch.bfloat16


def test_backend_with_one_expert_and_without_tokens(log: standin.CallLog):
    """One expert: the 0-d cumsum MegaBlocks returns is reshaped; no tokens: no MegaBlocks call at all."""
    hidden = torch.randn(5, 16).bfloat16()
    lora_A, lora_B = torch.randn(1, 8, 16).bfloat16(), torch.randn(1, 16, 8).bfloat16()
    index, weight = torch.zeros(5, 1, dtype=torch.long), torch.rand(5, 1)
    out = megablocks_backend.megablocks_routed(hidden, lora_A, lora_B, index, weight, None)
    expected = weight.bfloat16() * (hidden @ lora_A[0].t() @ lora_B[0].t())
    torch.testing.assert_close(out, expected, rtol=3e-2, atol=3e-2)
    assert log.calls[0] == ("sort", {"end_bit": 1, "dtype": torch.int32, "size": 5})
    log.calls.clear()
    empty = megablocks_backend.megablocks_routed(hidden[:0], lora_A, lora_B, index[:0], weight[:0], None)
    assert empty.shape == (0, 16) and not log.calls
