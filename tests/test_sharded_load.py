"""PERFT on models Transformers shards at load time (``distributed_config``), two CPU processes over gloo.

Each sharded run is compared with one process on the whole batch (tests/distributed/sharded_worker.py): logits,
the adapter gradients of the first step, the adapter after several SGD steps, and the saved adapter file. Saving
runs with ``is_main_process`` on rank 0 only, as the Trainer calls it, so a rank left in a collective hangs the
run (and the hard timeout fails the test).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TOKEN_IDS, build_tiny
from distributed import sharded_worker
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig
from peft_perft.demo import BUNDLED_MODEL_DIR

WORKER = Path(sharded_worker.__file__)
TIMEOUT_S = 180
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def tiny_qwen3_moe() -> torch.nn.Module:
    """Qwen3-MoE in miniature: 4 experts, top-2, renormalised top-k weights."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        **TOKEN_IDS,
    )
    return Qwen3MoeForCausalLM(config).eval()


BUILDERS = {"olmoe": build_tiny, "qwen3_moe": tiny_qwen3_moe}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for family, build in BUILDERS.items():
        folders[family] = tmp_path_factory.mktemp(family)
        build().save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def references(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, no distributed_config, whole batch: the run every sharded run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    results = {}
    for family in BUILDERS:
        for variant in sharded_worker.CONFIGS:
            output = folder / f"{family}_{variant}.pt"
            sharded_worker.main(str(bases[family]), "single", variant, str(output))
            results[family, variant] = output
    return results


def run_ranks_of(worker: Path, *arguments: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*command, str(worker), *arguments], capture_output=True, text=True, timeout=TIMEOUT_S)


def run_ranks(*arguments: str, processes: int = 2) -> subprocess.CompletedProcess:
    return run_ranks_of(WORKER, *arguments, processes=processes)


def ranks_sharing(name: str, layout: str) -> int:
    """Over how many ranks a layout splits an adapter tensor: with ep_implementation="perft" each of the 2 EP ranks
    holds the PERFT-E adapter experts of its local base experts; under tp_size=2 alone each TP rank holds half of
    the bottleneck of every adapter expert (PERFT-R's router stays whole); otherwise each rank holds all of it."""
    if layout.endswith("_sharded"):
        return 2
    return 2 if layout == "tp" and ".perft_router." not in name else 1


def assert_holds_its_share(held: dict[str, int], whole: dict[str, int], layout: str) -> None:
    """Per-rank adapter memory: the elements each rank stores, tensor by tensor."""
    assert sorted(held) == sorted(whole)
    for name, elements in whole.items():
        assert held[name] == elements // ranks_sharing(name, layout), name


def assert_does_its_share(flops: int, whole: int, variant: str) -> None:
    """Per-rank adapter compute under tp_size=2, from FLOPs counted in one forward of the first batch (adapter on
    minus off). Each rank computes half of the adapter experts' work and the whole (replicated) router, so twice a
    rank's count minus one process's is the router's alone: 2 * tokens * hidden * N per layer (0 for D and S)."""
    config = sharded_worker.CONFIGS[variant]
    tokens, hidden, layers = sharded_worker.GLOBAL_BATCH * 8, 32, 2
    router = 2 * tokens * hidden * config.get("num_experts", 0) * layers if config["variant"] == "R" else 0
    assert whole > 0
    assert 2 * flops - whole == router


def assert_same_tensors(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, **TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def sharded_runs(bases: dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, str], Path]:
    """Run (family, variant, layout) on two ranks once per module; return rank 0's output file."""
    outputs: dict[tuple[str, str, str], Path] = {}

    def run(family: str, variant: str, layout: str) -> Path:
        if (family, variant, layout) not in outputs:
            output = tmp_path_factory.mktemp(f"{family}_{variant}_{layout}") / "run.pt"
            result = run_ranks(str(bases[family]), layout, variant, str(output))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            outputs[family, variant, layout] = output
        return outputs[family, variant, layout]

    return run


@pytest.mark.parametrize(
    ("family", "variant", "layout"),
    [
        ("olmoe", "R", "fsdp_ep"),
        ("qwen3_moe", "R", "tp_ep"),
        ("qwen3_moe", "E", "fsdp_ep"),
        ("olmoe", "E", "tp_ep_sharded"),
        ("qwen3_moe", "E", "fsdp_ep_sharded"),
        ("olmoe", "R_aux", "tp"),
        ("qwen3_moe", "E", "tp"),
    ],
)
def test_sharded_run_matches_one_process(
    family: str, variant: str, layout: str, bases: dict, sharded_runs: Callable, references: dict
) -> None:
    output = sharded_runs(family, variant, layout)
    reference = torch.load(references[family, variant])
    for rank_output in (output, Path(f"{output}.rank1")):
        run = torch.load(rank_output)
        torch.testing.assert_close(run["logits"], reference["logits"], **TOLERANCE)
        assert_same_tensors(run["initial"], reference["initial"])  # broadcast from rank 0, though seeds differ
        assert_same_tensors(run["gradients"], reference["gradients"])
        assert_same_tensors(run["trained"], reference["trained"])
        assert_holds_its_share(run["held"], reference["held"], layout)
        if layout == "tp" and variant != "E":  # one process counts no FLOPs for E's fused grouped_mm term
            assert_does_its_share(run["adapter_flops"], reference["adapter_flops"], variant)
            # unload() gives every experts module Transformers' TP forward back, and the base model's logits.
            assert run["unloaded"] == {"wrapped_before": 2, "wrapped_after": 0, "base_logits_again": True}
            assert_reload_matches_one_process(run["reloaded_logits"], bases[family], output)
        # Saving gathers the sharded adapter tensors and nothing else (no base weight).
        sharded_tensors = sum(run["held"][name] < reference["held"][name] for name in run["held"])
        assert run["gathers_during_save"] == [sharded_tensors]
    assert not torch.equal(next(iter(reference["trained"].values())), next(iter(reference["initial"].values())))
    saved = load_file(f"{output}.adapter/adapter_model.safetensors")
    assert_same_tensors(saved, load_file(f"{references[family, variant]}.adapter/adapter_model.safetensors"))


def assert_reload_matches_one_process(reloaded_logits: torch.Tensor, base: Path, output: Path) -> None:
    """The adapter a TP run saved, loaded back onto its base split over TP (each rank takes its share of the saved
    tensors), gives the logits the same file gives in one process."""
    one_process = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), f"{output}.adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded_logits, one_process(input_ids=sharded_worker.batches()[0]).logits)


def test_adapter_saved_sharded_loads_onto_another_sharding_and_one_process(
    bases: dict, sharded_runs: Callable, references: dict, tmp_path: Path
) -> None:
    """A PERFT-E adapter trained with its experts sharded under TP+EP loads, sharded under FSDP+EP and in one
    process, to the same logits."""
    adapter = f"{sharded_runs('olmoe', 'E', 'tp_ep_sharded')}.adapter"
    loaded = tmp_path / "loaded.pt"
    result = run_ranks(str(bases["olmoe"]), "fsdp_ep_sharded", "E", str(loaded), adapter)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one_process = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["olmoe"]), adapter)
    with torch.no_grad():
        expected = one_process(input_ids=sharded_worker.batches()[0]).logits
    torch.testing.assert_close(torch.load(loaded)["logits"], expected, **TOLERANCE)
    untrained = torch.load(references["olmoe", "E"])["logits"]
    assert not torch.allclose(expected, untrained, **TOLERANCE), "the trained adapter must change the logits"


def test_pipeline_parallel_is_refused_at_get_peft_model() -> None:
    """Each pipeline stage would hold only its layers' adapter tensors: refused, with the reason, before injection."""
    from peft import get_peft_model

    model = build_tiny()
    model.config.distributed_config = DistributedConfig(pp_size=2)
    with pytest.raises(NotImplementedError, match="pipeline parallelism"):
        get_peft_model(model, PerftConfig(variant="R", r=4, num_experts=4, top_k=2))


def test_trainer_checkpoints_on_a_model_sharded_at_load(tmp_path: Path) -> None:
    """examples/sft_perft.py's sharding flags (``--fsdp_size 2 --ep_size 2``, TRL's SFTTrainer, a checkpoint every
    step) on the bundled tiny OLMoE: both ranks finish, train the same adapter, and the last checkpoint holds it."""
    worker = WORKER.parent / "trainer_worker.py"
    dataset = Path(__file__).parent / "fixtures" / "llm_adapters" / "gsm8k" / "test.json"
    result = run_ranks_of(worker, str(BUNDLED_MODEL_DIR), str(dataset), str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = torch.load(tmp_path / "final.rank0.pt")
    assert_same_tensors(torch.load(tmp_path / "final.rank1.pt"), final)
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert_same_tensors(saved, {name.removesuffix(".default"): tensor for name, tensor in final.items()})
    first = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert any(not torch.equal(first[name], saved[name]) for name in saved), "step 2 must change the adapter"


def test_sharded_perft_e_with_expert_replicas_is_refused_on_four_ranks(bases: dict, tmp_path: Path) -> None:
    """Sharded PERFT-E needs each expert on one rank: with 2 copies of each (fsdp_size=4, ep_size=2: efsdp_size=2)
    or 2 data-parallel replicas (dp_replicate_size=2) every one of 4 ranks refuses it at get_peft_model."""
    worker = WORKER.parent / "refusal_worker.py"
    output = tmp_path / "errors"
    result = run_ranks_of(worker, str(bases["olmoe"]), str(output), processes=4)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(4):
        errors = torch.load(f"{output}.rank{rank}")
        assert "efsdp_size=2" in errors["efsdp"] and "dp_replicate_size=1" in errors["efsdp"]
        assert "dp_replicate_size=2" in errors["dp_replicate"] and "efsdp_size=1" in errors["dp_replicate"]
        assert all("ep_implementation='perft'" in error for error in errors.values())
