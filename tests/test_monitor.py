"""Routing monitor, report and trace on a tiny OLMoE, checked against routing recomputed here from the router
weights; a forced collapse must be reported and warned about."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny, char_tokenizer
from datasets import Dataset
from peft import get_peft_model
from test_trl import CHARACTERS, record_forwards, reference_perft_aux_loss
from torch.utils.data import Dataset as TorchDataset
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM, Trainer, TrainingArguments

from peft_perft import PerftConfig, PerftMoeBlock
from peft_perft.monitor import (
    CollapseCriteria,
    RouterCollapseWarning,
    RoutingMonitor,
    RoutingMonitorCallback,
    add_routing_monitor,
    routing_report,
    routing_trace,
)

NUM_EXPERTS, TOP_K = 4, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def perft_model(seed: int = 0, **config) -> torch.nn.Module:
    settings = {"variant": "R", "r": 4, "num_experts": NUM_EXPERTS, "top_k": TOP_K, "init_weights": False}
    settings.update(config)
    return get_peft_model(build_tiny(seed=seed, output_router_logits=True), PerftConfig(**settings))


def blocks(model: torch.nn.Module) -> list[PerftMoeBlock]:
    return [module for module in model.modules() if isinstance(module, PerftMoeBlock)]


def padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 64, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[2, 7:] = 0  # right padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def capture_block_inputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Record what every adapted block receives, to recompute its routing independently."""
    inputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(
            lambda module, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for block in blocks(model)
    ]
    return inputs, handles


def recomputed_topk(
    hidden: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(torch.nn.functional.linear(hidden.float(), weight.float()), dim=-1)
    top_weight, top_index = probs.topk(top_k, dim=-1)
    return top_index, top_weight / top_weight.sum(-1, keepdim=True) if normalise else top_weight


def expected_load(index: torch.Tensor, keep: torch.Tensor, num_experts: int) -> list[float]:
    counts = torch.zeros(num_experts)
    for row in index[keep]:
        counts[row] += 1
    return (counts / keep.sum()).tolist()


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.05, f"{path.name} is blank"


class TokenDataset(TorchDataset):
    """Fixed random token sequences for a plain transformers Trainer (causal LM: labels = inputs)."""

    def __init__(self, num_examples: int = 16, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(5)
        self.input_ids = torch.randint(3, 64, (num_examples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def collapse_routers(model: torch.nn.Module) -> None:
    """Make every token pick PERFT experts 0 then 1: channel 0 of the residual stream is made large and positive
    and only experts 0 and 1 read it."""
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[:, 0] = 1.0
        for block in blocks(model):
            router = block.perft_router["default"]
            router.zero_()
            router[0, 0], router[1, 0] = 10.0, 5.0


def test_monitor_counts_match_routing_recomputed_from_router_weights() -> None:
    model = perft_model().eval()
    batch = padded_batch()
    keep = batch["attention_mask"].reshape(-1).bool()
    hidden_inputs, handles = capture_block_inputs(model)
    with RoutingMonitor(model) as monitor, torch.no_grad():
        model(**batch)
        report = monitor.read()
    for handle in handles:
        handle.remove()
    by_key = {(stats.layer, stats.router): stats for stats in report.routers}
    assert set(by_key) == {(layer, router) for layer in (0, 1) for router in ("base", "perft")}
    for layer, (block, hidden) in enumerate(zip(blocks(model), hidden_inputs, strict=True)):
        base_index, _ = recomputed_topk(hidden, block.base_layer.gate.weight, TOP_K, normalise=False)
        perft_index, _ = recomputed_topk(hidden, block.perft_router["default"], TOP_K, normalise=True)
        for router, index in (("base", base_index), ("perft", perft_index)):
            stats = by_key[(layer, router)]
            load = expected_load(index, keep, NUM_EXPERTS)
            assert stats.tokens == keep.sum().item()
            assert stats.load == pytest.approx(load)
            assert stats.max_load == pytest.approx(max(load))
            share = [value / TOP_K for value in load]
            entropy = -sum(p * math.log(p) for p in share if p > 0) / math.log(NUM_EXPERTS)
            assert stats.entropy == pytest.approx(entropy)
            mean = sum(load) / NUM_EXPERTS
            assert stats.cv == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in load) / NUM_EXPERTS) / mean)
            assert stats.dead_experts == [expert for expert in range(NUM_EXPERTS) if load[expert] == 0]
        assert by_key[(layer, "perft")].drift == 0.0
    assert report.forward_passes == 1


def test_monitor_reads_the_host_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting adds no host transfer to a forward pass: the same tensor-to-host calls happen with and without it."""
    model = perft_model().eval()
    batch = padded_batch()
    host_reads = {"count": 0}
    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            host_reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)

    def reads_during_forwards() -> int:
        host_reads["count"] = 0
        with torch.no_grad():
            for _ in range(3):
                model(**batch)
        return host_reads["count"]

    without_monitor = reads_during_forwards()
    monitor = RoutingMonitor(model).attach()
    with_monitor = reads_during_forwards()
    monkeypatch.undo()
    report = monitor.read()
    monitor.detach()
    assert with_monitor == without_monitor
    assert report.forward_passes == 3


def test_trace_matches_recomputed_routing_and_exports(tmp_path: Path) -> None:
    model = perft_model().eval()
    batch = padded_batch()
    experts_modules = [block.base_layer.experts for block in blocks(model)]
    hidden_inputs, handles = capture_block_inputs(model)
    trace = routing_trace(model, batch)
    for handle in handles:
        handle.remove()
    # Off unless asked for: no hook stays behind.
    assert all(not module._forward_hooks for module in experts_modules)
    keep = batch["attention_mask"].reshape(-1).bool()
    assert len(trace.rows) == keep.sum().item() * 2
    rows = {(row["example"], row["position"], row["layer"]): row for row in trace.rows}
    width = batch["input_ids"].shape[1]
    for layer, (block, hidden) in enumerate(zip(blocks(model), hidden_inputs, strict=True)):
        base = recomputed_topk(hidden, block.base_layer.gate.weight, TOP_K, normalise=False)
        perft = recomputed_topk(hidden, block.perft_router["default"], TOP_K, normalise=True)
        for flat in keep.nonzero().flatten().tolist():
            row = rows[(flat // width, flat % width, layer)]
            assert row["token_id"] == batch["input_ids"].reshape(-1)[flat].item()
            assert row["base_experts"] == base[0][flat].tolist()
            assert row["base_weights"] == pytest.approx(base[1][flat].tolist(), abs=1e-6)
            assert row["perft_experts"] == perft[0][flat].tolist()
            assert row["perft_weights"] == pytest.approx(perft[1][flat].tolist(), abs=1e-6)
            assert row["variant"] == "R" and row["adapter"] == "default"
    jsonl_rows = [json.loads(line) for line in trace.to_jsonl(tmp_path / "trace.jsonl").read_text().splitlines()]
    assert jsonl_rows == trace.rows
    parquet_rows = pq.read_table(trace.to_parquet(tmp_path / "trace.parquet")).to_pylist()
    assert len(parquet_rows) == len(trace.rows)
    for parquet_row, row in zip(parquet_rows, trace.rows, strict=True):
        assert parquet_row["perft_experts"] == row["perft_experts"]
        assert parquet_row["base_weights"] == pytest.approx(row["base_weights"])
        assert parquet_row["position"] == row["position"] and parquet_row["layer"] == row["layer"]
    assert_valid_png(trace.plot(tmp_path / "example0.png", example=0))
    with pytest.raises(ValueError, match="Example 7 is not in this trace"):
        trace.plot(tmp_path / "missing.png", example=7)


def test_trace_of_perft_e_uses_the_base_routing() -> None:
    model = perft_model(variant="E", num_experts=None, top_k=None)
    trace = routing_trace(model, {"input_ids": [[5, 6, 7, 8]]})
    assert len(trace.rows) == 8
    for row in trace.rows:
        assert row["variant"] == "E"
        assert row["perft_experts"] == row["base_experts"]
        assert row["perft_weights"] == row["base_weights"]


def test_routing_report_is_json_data_and_pictures(tmp_path: Path) -> None:
    model = perft_model().train()
    batch = padded_batch()
    examples = [
        {"input_ids": ids[mask.bool()].tolist()}
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    report = routing_report(model, examples, batch_size=2, output_dir=tmp_path)
    assert model.training  # mode restored
    data = json.loads(json.dumps(report.to_dict()))
    assert data == json.loads((tmp_path / "routing_report.json").read_text())
    assert {router["router"] for router in data["routers"]} == {"base", "perft"}
    # Same figures as one padded batch through the monitor.
    with RoutingMonitor(model) as monitor, torch.no_grad():
        model.eval()
        model(**batch)
        direct = monitor.read()
    for from_examples, from_batch in zip(report.routers, direct.routers, strict=True):
        assert from_examples.tokens == from_batch.tokens
        assert from_examples.load == pytest.approx(from_batch.load, abs=1e-6)
    assert report.forward_passes == 2  # batches of 2 and 1 examples
    assert all(stats.drift is None for stats in report.routers)
    pictures = sorted(tmp_path.glob("*.png"))
    assert [path.name for path in pictures] == ["routing_base.png", "routing_perft.png"]
    for path in pictures:
        assert_valid_png(path)
    assert report.save_heatmaps(tmp_path / "again") == [
        tmp_path / "again" / name for name in ("routing_base.png", "routing_perft.png")
    ]


def test_callback_logs_through_the_trainer_and_writes_heatmaps(tmp_path: Path) -> None:
    model = perft_model()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset())
    callback = add_routing_monitor(trainer, per_layer=True)
    forwards = record_forwards(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [warning for warning in caught if issubclass(warning.category, RouterCollapseWarning)]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for window, entry in enumerate(logs):
        for key in ("routing/perft/max_load", "routing/base/entropy", "routing/perft/layer_1/cv", "aux_loss"):
            assert key in entry
        window_forwards = forwards[2 * window : 2 * window + 2]
        config = model.peft_config["default"]
        aux = [reference_perft_aux_loss(forward, config) for forward in window_forwards]
        assert entry["perft_aux_loss"] == pytest.approx(sum(aux) / 2, rel=1e-5)
        base_aux = [float(forward["output"]["aux_loss"].detach()) for forward in window_forwards]
        assert entry["aux_loss"] == pytest.approx(sum(base_aux) / 2, rel=1e-6)
    assert logs[-1]["routing/perft/router_drift"] > 0
    final = callback.report()
    assert all(stats.tokens == 4 * 4 * 12 for stats in final.routers)  # 4 steps x 4 sequences x 12 tokens
    routing_dir = tmp_path / "routing"
    assert sorted(path.name for path in callback.saved_files) == sorted(
        ["routing_base.png", "routing_perft.png", "routing_report.json"]
    )
    for name in ("routing_base.png", "routing_perft.png"):
        assert_valid_png(routing_dir / name)
    assert json.loads((routing_dir / "routing_report.json").read_text()) == final.to_dict()


def test_collapsed_router_is_reported_and_warned(tmp_path: Path) -> None:
    model = perft_model()
    collapse_routers(model)
    args = training_args(tmp_path, learning_rate=1e-4, logging_steps=1, max_steps=3)
    callback = RoutingMonitorCallback(criteria=CollapseCriteria(patience=2), output_dir=tmp_path / "heatmaps")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.warns(RouterCollapseWarning, match="collapsed at step 2") as caught:
        trainer.train()
    warned_layers = sorted({str(warning.message).split(" in layer ")[1][0] for warning in caught})
    assert warned_layers == ["0", "1"]
    assert [(event["step"], event["layer"]) for event in callback.collapse_events] == [(2, 0), (2, 1)]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        assert entry["routing/perft/max_load"] == pytest.approx(1.0)
        assert entry["routing/perft/dead_experts"] == 4.0  # experts 2 and 3 in both layers
    for stats in callback.report().routers:
        if stats.router == "perft":
            assert stats.load == pytest.approx([1.0, 1.0, 0.0, 0.0])
            assert stats.dead_experts == [2, 3]
    report = routing_report(model, TokenDataset(num_examples=4))
    collapsed = report.collapsed()
    assert sorted(stats.layer for stats, _ in collapsed) == [0, 1]
    assert [reason for _, reason in collapsed] == [
        "expert 0 received 100% of the tokens; 2 of 4 experts received no token"
    ] * 2
    assert_valid_png(tmp_path / "heatmaps" / "routing_perft.png")


def test_collapse_by_max_load_with_top_1() -> None:
    model = perft_model(top_k=1)
    collapse_routers(model)
    report = routing_report(model, [{"input_ids": list(range(3, 15))}])
    perft = [stats for stats in report.routers if stats.router == "perft"]
    assert all(stats.max_load == 1.0 and stats.dead_experts == [1, 2, 3] for stats in perft)
    reasons = [reason for _, reason in report.collapsed(CollapseCriteria(max_load=0.9))]
    assert reasons == ["expert 0 received 100% of the tokens; 3 of 4 experts received no token"] * 2
    assert [reason for _, reason in report.collapsed(CollapseCriteria(dead_fraction=1.0))] == [
        "expert 0 received 100% of the tokens"
    ] * 2


def test_tensorboard_receives_the_routing_scalars(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args = training_args(tmp_path, report_to="tensorboard", max_steps=2)
    trainer = Trainer(model=perft_model(), args=args, train_dataset=TokenDataset())
    add_routing_monitor(trainer)
    trainer.train()
    (run_dir,) = (tmp_path / "runs").iterdir()  # the Trainer's default logging folder
    accumulator = event_accumulator.EventAccumulator(str(run_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/perft_aux_loss", "train/routing/perft/max_load", "train/routing/base/dead_experts"} <= tags
    logged = trainer.state.log_history[0]["routing/perft/max_load"]
    assert accumulator.Scalars("train/routing/perft/max_load")[-1].value == pytest.approx(logged)


def test_slots_routed_to_zero_computation_experts_are_not_counted() -> None:
    """LongCat-Flash routes some slots to identity ("zero") experts past its 4 weighted ones; those are no load."""
    config = LongcatFlashConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        ffn_hidden_size=32,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
        moe_topk=2,
        n_routed_experts=NUM_EXPERTS,
        zero_expert_num=2,
        expert_ffn_hidden_size=16,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LongcatFlashForCausalLM(config).eval()
    # Route one slot of every token to a zero expert by construction, whatever the initialisation: the selection
    # bias (scores lie in [0, 1]) always picks the first zero expert and never the second; weights are unchanged.
    with torch.no_grad():
        base.model.layers[0].mlp.router.e_score_correction_bias[NUM_EXPERTS:] = torch.tensor([1.0, -1.0])
    model = get_peft_model(base, PerftConfig(variant="R", r=2, num_experts=4, top_k=2))
    block = blocks(model)[0]
    received = []
    # The router's own choice is the oracle: the block hands zero-expert slots on to its experts in a form that
    # changed between Transformers releases (indices past the weighted experts, or a weighted expert with weight 0).
    router = block.base_layer.router
    router.register_forward_hook(lambda module, args, output: received.append((output[2].clone(), output[1].clone())))
    input_ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with RoutingMonitor(model) as monitor, torch.no_grad():
        model(input_ids=input_ids)
        report = monitor.read()
    trace = routing_trace(model, {"input_ids": input_ids})
    raw_index, raw_weight = received[0][0].reshape(-1, 2), received[0][1].reshape(-1, 2)
    assert ((raw_index >= NUM_EXPERTS).sum(dim=1) == 1).all(), "each token should route one slot to a zero expert"
    weighted = raw_index < NUM_EXPERTS
    expected = [(raw_index == expert).sum().item() / raw_index.shape[0] for expert in range(NUM_EXPERTS)]
    (base,) = [stats for stats in report.routers if stats.router == "base"]
    assert base.load == pytest.approx(expected)
    assert sum(base.load) < TOP_K
    for row in trace.rows:
        flat = row["example"] * input_ids.shape[1] + row["position"]
        assert row["base_experts"] == raw_index[flat][weighted[flat]].tolist()
        assert row["base_weights"] == pytest.approx(raw_weight[flat][weighted[flat]].tolist())


def test_routing_report_reads_text_examples_with_a_tokenizer() -> None:
    model = perft_model()
    tokenizer = char_tokenizer(CHARACTERS)
    examples = [{"prompt": "abc =>", "completion": " cba"}, {"text": "moe route", "prompt": None}]
    report = routing_report(model, examples, tokenizer=tokenizer, batch_size=8)
    expected_tokens = len(tokenizer("abc => cba").input_ids) + len(tokenizer("moe route").input_ids)
    assert all(stats.tokens == expected_tokens for stats in report.routers)
    assert report.forward_passes == 1
    for same_text in (["abc => cba", "moe route"], Dataset.from_dict({"text": ["abc => cba", "moe route"]})):
        assert routing_report(model, same_text, tokenizer=tokenizer).to_dict() == report.to_dict()
    with pytest.raises(ValueError, match="no tokenizer"):
        routing_report(model, ["abc"])
