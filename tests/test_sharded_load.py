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
from transformers import (
    AutoModelForCausalLM,
    AXK1Config,
    Cohere2MoeConfig,
    Llama4ForCausalLM,
    Llama4TextConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig
from peft_perft.demo import BUNDLED_MODEL_DIR

WORKER = Path(sharded_worker.__file__)
FOUR_RANK_WORKER = WORKER.parent / "four_rank_worker.py"
TIMEOUT_S = 180
CASE_TIMEOUT_S = 60
"""A launch's hard timeout: TIMEOUT_S for the start, the imports and its first case, CASE_TIMEOUT_S per further case."""
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


def tiny_llama4_text() -> torch.nn.Module:
    """Llama 4 text in miniature: 4 experts, top-1, a shared expert, every layer an MoE layer. Its TP plan still
    names the deprecated ``moe_tp_experts`` style, which splits each expert's width over the TP ranks."""
    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        **TOKEN_IDS,
    )
    return Llama4ForCausalLM(config).eval()


def tiny_axk1() -> torch.nn.Module:
    """AXK1 in miniature, a dense layer then an MoE layer, whose block normalises the sum of its routed and shared
    experts' outputs (``post_mlp_layernorm``): an R, D or S term added inside the experts' call, before that norm,
    is not the one-process term, added to the block's output."""
    torch.manual_seed(0)
    config = AXK1Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        **TOKEN_IDS,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_cohere2_moe() -> torch.nn.Module:
    """Cohere2-MoE in miniature, two MoE layers, whose blocks average the routed and shared experts' outputs
    (``shared_expert_combination_strategy="average"``, its default): a term added to the experts' output inside
    the dispatch is halved, unlike the one-process term, added to the block's output."""
    torch.manual_seed(0)
    config = Cohere2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        layer_types=["sliding_attention", "full_attention"],
        mlp_layer_types=["sparse", "sparse"],
        **TOKEN_IDS,
    )
    return AutoModelForCausalLM.from_config(config).eval()


BUILDERS = {
    "olmoe": build_tiny,
    "qwen3_moe": tiny_qwen3_moe,
    "llama4_text": tiny_llama4_text,
    "axk1": tiny_axk1,
    "cohere2_moe": tiny_cohere2_moe,
    # Mixtral scales its block input in place in training (router jitter): PERFT's TP path must see it unscaled.
    "mixtral_jitter": lambda: build_tiny("mixtral", router_jitter_noise=0.2),
}
TP_CASES = [
    ("olmoe", "R_aux"),
    ("qwen3_moe", "E"),
    ("olmoe", "D"),
    ("qwen3_moe", "S"),
    ("olmoe", "R_r3"),
    ("mixtral_jitter", "R"),
    ("axk1", "S"),
]
"""(family, variant) run under tp_size=2, all in one launch."""
TP_EP_SHARDED_CASES = [
    ("olmoe", "E"),
    ("olmoe", "R_aux"),
    ("olmoe", "D"),
    ("qwen3_moe", "S"),
    ("mixtral_jitter", "R"),
    ("cohere2_moe", "S"),
]
"""(family, variant) run under tp_size=2, ep_size=2, ep_implementation="perft", all in one launch: E sharded like
the experts, R, D and S on each TP rank's token rows (of the block's input as it was before Mixtral's in place
router jitter, added to the block's output after Cohere2-MoE's average)."""
FOUR_RANK_CASES = [
    ("olmoe", "R", "tp_fsdp"),
    ("qwen3_moe", "E", "tp_fsdp"),
    ("qwen3_moe", "R", "tp_fsdp_ep"),
    ("olmoe", "E", "tp_fsdp_ep_sharded"),
    ("olmoe", "R", "tp_fsdp_ep_sharded"),  # on each TP rank's token rows, 2 batches
]
"""(family, variant, layout) run on 4 ranks, in the launch that also checks the refusals."""
FOUR_RANK_LAYOUTS = {layout for _, _, layout in FOUR_RANK_CASES}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for family, build in BUILDERS.items():
        folders[family] = tmp_path_factory.mktemp(family)
        build().save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def references(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """One process, no distributed_config, whole batch: the run every sharded run must reproduce (run when first
    asked for, once per module)."""
    folder = tmp_path_factory.mktemp("reference")
    results: dict[tuple[str, str], Path] = {}

    def reference(family: str, variant: str) -> Path:
        if (family, variant) not in results:
            output = folder / f"{family}_{variant}.pt"
            sharded_worker.run_case("single", str(bases[family]), variant, str(output))
            results[family, variant] = output
        return results[family, variant]

    return reference


def run_ranks_of(worker: Path, *arguments: str, processes: int = 2, cases: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    timeout = TIMEOUT_S + CASE_TIMEOUT_S * (cases - 1)
    return subprocess.run([*command, str(worker), *arguments], capture_output=True, text=True, timeout=timeout)


def run_ranks(*cases: str) -> subprocess.CompletedProcess:
    """Two ranks running sharded_worker.py's CASEs (``LAYOUT,BASE,VARIANT,OUTPUT[,ADAPTER]``) one after the other."""
    return run_ranks_of(WORKER, *cases, cases=len(cases))


def ranks_of(layout: str) -> int:
    return 4 if layout in FOUR_RANK_LAYOUTS else 2


def is_split_over_tp(layout: str, variant: str) -> bool:
    """Under tp_size=2 without EP (alone or beside FSDP) an adapter is split on its bottleneck when r is even (else
    it stays replicated)."""
    return layout in ("tp", "tp_fsdp") and sharded_worker.CONFIGS[variant]["r"] % 2 == 0


def ranks_sharing(name: str, layout: str, variant: str) -> int:
    """Over how many ranks a layout splits an adapter tensor: with ep_implementation="perft" each EP rank holds the
    PERFT-E adapter experts of its local base experts; split over tp_size=2 each TP rank holds half of the
    bottleneck of every adapter expert (PERFT-R's router stays whole); otherwise each rank holds all of it."""
    settings = sharded_worker.LAYOUTS[layout]
    if settings.get("ep_implementation") == "perft" and variant == "E":
        return settings["ep_size"]
    return 2 if is_split_over_tp(layout, variant) and ".perft_router." not in name else 1


def assert_holds_its_share(held: dict[str, int], whole: dict[str, int], layout: str, variant: str) -> None:
    """Per-rank adapter memory: the elements each rank stores, tensor by tensor."""
    assert sorted(held) == sorted(whole)
    for name, elements in whole.items():
        assert held[name] == elements // ranks_sharing(name, layout, variant), name


def splits_work(layout: str, variant: str) -> bool:
    """Whether each of 2 TP ranks computes half of R, D or S: split on the bottleneck (`is_split_over_tp`), or on
    the tokens under TP with EP and ep_implementation="perft" (any r)."""
    return is_split_over_tp(layout, variant) or layout == "tp_ep_sharded"


def assert_does_its_share(flops: int, whole: int, variant: str, split: bool) -> None:
    """Per-rank adapter compute under tp_size=2, from FLOPs counted in one forward of the first batch (adapter on
    minus off). Split (on the bottleneck or on the tokens), each rank computes half of the adapter experts' work and
    the whole (replicated) router, so twice a rank's count minus one process's is the router's alone:
    2 * tokens * hidden * N per layer (0 for D and S). Replicated, each rank computes all of it."""
    config = sharded_worker.CONFIGS[variant]
    tokens, hidden, layers = sharded_worker.GLOBAL_BATCH * 8, 32, 2
    router = 2 * tokens * hidden * config.get("num_experts", 0) * layers if config["variant"] == "R" else 0
    assert whole > 0
    assert 2 * flops - whole == (router if split else whole)


def assert_gathers_its_rows(calls: dict[str, dict[str, int]], variant: str) -> None:
    """Under TP with EP, R, D and S on each rank's token rows need the collectives of R, D and S replicated (one
    training step) and, per MoE block, one all-gather of the rows' terms in forward and one of their input's
    gradient rows in backward, plus one of PERFT-R's top-k weight gradient rows."""
    expected = dict(calls["replicated"])
    per_block = 3 if sharded_worker.CONFIGS[variant]["variant"] == "R" else 2
    expected["_c10d_functional::all_gather_into_tensor"] += 2 * per_block  # 2 MoE blocks
    assert calls["rows"] == expected


def assert_same_tensors(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, **TOLERANCE, msg=name)


LAUNCHED_TOGETHER = [
    [*((family, variant, "tp") for family, variant in TP_CASES), ("olmoe", "R", "tp_without_mesh")],
    [*((family, variant, "tp_ep_sharded") for family, variant in TP_EP_SHARDED_CASES)],
]
"""The cases that share one 2-process launch, each launch's in its order: a layout run with a private Transformers
detail changed (`sharded_worker.FORCED_UPSTREAM_CHANGES`) comes last, after the cases that must warn nothing."""
LAUNCHED_TOGETHER_LAYOUTS = {layout for cases in LAUNCHED_TOGETHER for _, _, layout in cases}


def assert_warns_only_of_forced_changes(messages: list[str], layout: str) -> None:
    """No warning about Transformers' private details on the installed release (they are as PERFT expects), and
    exactly one per process (once, though the ``tp_without_mesh`` run calls get_peft_model twice) naming the
    feature that falls back where the run changed one."""
    feature = sharded_worker.FORCED_UPSTREAM_CHANGES.get(layout)
    if feature is None:
        assert messages == []
    else:
        [message] = messages
        assert feature in message and "checked on transformers 5.25.0" in message


class ShardedRuns:
    """The multi-process runs of this module, each launched when a test first needs it, once: the tp_size=2 cases
    together, the tp_size=2, ep_size=2 ``perft`` cases together, the 4-rank cases together with the 4-rank
    refusals, any other case alone."""

    def __init__(self, bases: dict[str, Path], folder: Path) -> None:
        self.bases, self.folder = bases, folder
        self.outputs: dict[tuple[str, str, str], Path] = {}
        self.refusals_output: Path | None = None

    def output(self, family: str, variant: str, layout: str) -> Path:
        """Rank 0's output file of a run (rank N's is beside it, suffixed ``.rankN``)."""
        if (family, variant, layout) not in self.outputs:
            launch = next((cases for cases in LAUNCHED_TOGETHER if (family, variant, layout) in cases), None)
            if launch is not None:
                self._launch(WORKER, [], launch)
            elif layout in FOUR_RANK_LAYOUTS:
                self.refusals()
            else:
                self._launch(WORKER, [], [(family, variant, layout)])
        return self.outputs[family, variant, layout]

    def refusals(self) -> Path:
        """Where each of the 4 ranks wrote the errors of the layouts with expert replicas (``.rankN``)."""
        if self.refusals_output is None:
            errors = self.folder / "refusals"
            self._launch(FOUR_RANK_WORKER, [str(self.bases["olmoe"]), str(errors)], FOUR_RANK_CASES, processes=4)
            self.refusals_output = errors
        return self.refusals_output

    def _launch(
        self, worker: Path, arguments: list[str], cases: list[tuple[str, str, str]], processes: int = 2
    ) -> None:
        outputs = {case: self.folder / "_".join(case) / "run.pt" for case in cases}
        specs = []
        for (family, variant, layout), output in outputs.items():
            output.parent.mkdir()
            specs.append(",".join([layout, str(self.bases[family]), variant, str(output)]))
        result = run_ranks_of(worker, *arguments, *specs, processes=processes, cases=len(cases) + 1)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        self.outputs.update(outputs)


@pytest.fixture(scope="module")
def sharded_runs(bases: dict, tmp_path_factory: pytest.TempPathFactory) -> ShardedRuns:
    return ShardedRuns(bases, tmp_path_factory.mktemp("sharded"))


@pytest.mark.parametrize(
    ("family", "variant", "layout"),
    [
        ("olmoe", "R", "fsdp_ep"),
        ("qwen3_moe", "R", "tp_ep"),
        ("qwen3_moe", "E", "fsdp_ep"),
        ("qwen3_moe", "E", "fsdp_ep_sharded"),
        *[(family, variant, "tp") for family, variant in TP_CASES],
        *[(family, variant, "tp_ep_sharded") for family, variant in TP_EP_SHARDED_CASES],
        ("olmoe", "R", "tp_without_mesh"),
        *FOUR_RANK_CASES,
    ],
)
def test_sharded_run_matches_one_process(
    family: str, variant: str, layout: str, bases: dict, sharded_runs: ShardedRuns, references: Callable
) -> None:
    output = sharded_runs.output(family, variant, layout)
    reference = torch.load(references(family, variant))
    rank_outputs = [output, *(Path(f"{output}.rank{rank}") for rank in range(1, ranks_of(layout)))]
    for rank_output in rank_outputs:
        run = torch.load(rank_output)
        torch.testing.assert_close(run["logits"], reference["logits"], **TOLERANCE)
        assert_same_tensors(run["initial"], reference["initial"])  # broadcast from rank 0, though seeds differ
        assert_same_tensors(run["gradients"], reference["gradients"])
        assert_same_tensors(run["trained"], reference["trained"])
        assert_holds_its_share(run["held"], reference["held"], layout, variant)
        split = is_split_over_tp(layout, variant)
        assert_warns_only_of_forced_changes(run["upstream_warnings"], layout)
        if layout in LAUNCHED_TOGETHER_LAYOUTS and variant != "E":  # one process counts no FLOPs for E's fused term
            assert_does_its_share(
                run["adapter_flops"], reference["adapter_flops"], variant, splits_work(layout, variant)
            )
        if "collectives" in run:
            assert_gathers_its_rows(run["collectives"], variant)
        if layout in sharded_worker.TP_ALONE:
            # unload() gives every experts module the forward it had before PERFT back (wrapped for split PERFT-E
            # adapters), and the base model's logits.
            wrapped = 2 if split and sharded_worker.CONFIGS[variant]["variant"] == "E" else 0
            assert run["unloaded"] == {"wrapped_before": wrapped, "wrapped_after": 0, "base_logits_again": True}
            assert_reload_matches_one_process(run["reloaded_logits"], bases[family], output)
        # Saving gathers the sharded adapter tensors and nothing else (no base weight).
        sharded_tensors = sum(run["held"][name] < reference["held"][name] for name in run["held"])
        assert run["gathers_during_save"] == [sharded_tensors]
    assert not torch.equal(next(iter(reference["trained"].values())), next(iter(reference["initial"].values())))
    saved = load_file(f"{output}.adapter/adapter_model.safetensors")
    assert_same_tensors(saved, load_file(f"{references(family, variant)}.adapter/adapter_model.safetensors"))


def assert_reload_matches_one_process(reloaded_logits: torch.Tensor, base: Path, output: Path) -> None:
    """The adapter a TP run saved, loaded back onto its base split over TP (each rank takes its share of the saved
    tensors), gives the logits the same file gives in one process."""
    one_process = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), f"{output}.adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded_logits, one_process(input_ids=sharded_worker.batches()[0]).logits)


def test_adapter_saved_sharded_loads_onto_another_sharding_and_one_process(
    bases: dict, sharded_runs: ShardedRuns, references: Callable, tmp_path: Path
) -> None:
    """A PERFT-E adapter trained with its experts sharded under TP+EP loads, sharded under FSDP+EP and in one
    process, to the same logits."""
    adapter = f"{sharded_runs.output('olmoe', 'E', 'tp_ep_sharded')}.adapter"
    loaded = tmp_path / "loaded.pt"
    result = run_ranks(",".join(["fsdp_ep_sharded", str(bases["olmoe"]), "E", str(loaded), adapter]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one_process = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["olmoe"]), adapter)
    with torch.no_grad():
        expected = one_process(input_ids=sharded_worker.batches()[0]).logits
    torch.testing.assert_close(torch.load(loaded)["logits"], expected, **TOLERANCE)
    untrained = torch.load(references("olmoe", "E"))["logits"]
    assert not torch.allclose(expected, untrained, **TOLERANCE), "the trained adapter must change the logits"


def test_llama4_split_over_tp_runs_a_trained_adapter_as_one_process(
    bases: dict, references: Callable, tmp_path: Path
) -> None:
    """Llama 4's experts take every token once per expert, pre-scaled by its router score, so no row of their
    output is a token's (PERFT once added R's, D's and S's split terms to those rows and failed on the shapes; they
    go to the block's output now, PERFT-E stays replicated). Each adapter, trained in one process, loaded onto the
    model split over tp_size=2, gives one process's logits. (Training under TP fails inside Transformers 5.25's own
    Llama 4 block, with or without an adapter: docs/big_models.md.)"""
    variants = ("R", "E", "S")
    adapters = {variant: f"{references('llama4_text', variant)}.adapter" for variant in variants}
    outputs = {variant: tmp_path / f"{variant}.pt" for variant in variants}
    base = str(bases["llama4_text"])
    result = run_ranks(
        *(",".join(["tp", base, variant, str(outputs[variant]), adapters[variant]]) for variant in variants)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tokens = sharded_worker.batches()[0]
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base)(input_ids=tokens).logits
        for variant in variants:
            one_process = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[variant])
            expected = one_process(input_ids=tokens).logits
            torch.testing.assert_close(torch.load(outputs[variant])["logits"], expected, **TOLERANCE)
            assert not torch.allclose(expected, base_logits, **TOLERANCE), f"{variant}: the adapter must count"


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


def test_sharded_perft_e_with_expert_replicas_is_refused_on_four_ranks(sharded_runs: ShardedRuns) -> None:
    """Sharded PERFT-E needs each expert on one rank: with 2 copies of each (fsdp_size=4, ep_size=2: efsdp_size=2)
    or 2 data-parallel replicas (dp_replicate_size=2) every one of 4 ranks refuses it at get_peft_model."""
    output = sharded_runs.refusals()
    for rank in range(4):
        errors = torch.load(f"{output}.rank{rank}")
        assert "efsdp_size=2" in errors["efsdp"] and "dp_replicate_size=1" in errors["efsdp"]
        assert "dp_replicate_size=2" in errors["dp_replicate"] and "efsdp_size=1" in errors["dp_replicate"]
        assert all("ep_implementation='perft'" in error for error in errors.values())
