"""PERFT runs on models Transformers shards at load time, one rank's part; launched by tests/test_sharded_load.py.

Usage: python -m torch.distributed.run --nproc_per_node N sharded_worker.py CASE [CASE ...]

Each CASE is ``LAYOUT,BASE,VARIANT,OUTPUT[,ADAPTER]`` and runs in the same processes, one after the other (the start
and the imports are paid once). BASE is a saved tiny MoE model. LAYOUT names a `DistributedConfig` from LAYOUTS
(``single`` loads it without one, in one process: the reference, run in the test's own process by `run_case`).
Every rank seeds its RNG with its own rank before `get_peft_model`, so the adapter is identical across ranks only if
PERFT broadcasts it; all ranks then share one seed for training (Mixtral's router jitter draws from it). Data-parallel
ranks (``fsdp_size``) train on their slice of the global batch; the ranks of a TP group share it. The worker records
the logits before training, the adapter gradients of the first step, the adapter after STEPS SGD steps, and saves
the adapter with ``is_main_process`` on rank 0 only (as the Trainer does); under ``tp`` it then unloads the adapter
and loads the saved one onto the unloaded base (split over TP again). With ADAPTER it instead loads that saved
adapter onto the sharded base and records logits. Every case records the `UpstreamDetailWarning`s it gave; the
layouts of FORCED_UPSTREAM_CHANGES run with a private Transformers detail PERFT relies on changed, as a new release
might change it.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import gc
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig
from peft_perft.layer import PerftMoeBlock
from peft_perft.parallel import token_slices
from peft_perft.parallel.saving import gathered_adapter_state_dict
from peft_perft.parallel.tensor_parallel import TENSOR_PARALLEL_SPLIT, TensorParallelExperts, UpstreamDetailWarning

GLOBAL_BATCH = 4
STEPS = 3
LAYOUTS = {
    "single": None,
    "tp": {"tp_size": 2},
    "tp_ep": {"tp_size": 2, "ep_size": 2},
    "fsdp": {"fsdp_size": 2},
    "fsdp_ep": {"fsdp_size": 2, "ep_size": 2},
    "tp_ep_sharded": {"tp_size": 2, "ep_size": 2, "ep_implementation": "perft"},
    "fsdp_ep_sharded": {"fsdp_size": 2, "ep_size": 2, "ep_implementation": "perft"},
    # 4 ranks: 2 batches, each shared by a TP group of 2; with EP every expert on one rank (efsdp_size = 2*2/4 = 1).
    "tp_fsdp": {"tp_size": 2, "fsdp_size": 2},
    "tp_fsdp_ep": {"tp_size": 2, "fsdp_size": 2, "ep_size": 4},
    "tp_fsdp_ep_sharded": {"tp_size": 2, "fsdp_size": 2, "ep_size": 4, "ep_implementation": "perft"},
    # As "tp" and "tp_ep_sharded", with a private Transformers detail changed (FORCED_UPSTREAM_CHANGES).
    "tp_without_mesh": {"tp_size": 2},
}
TP_ALONE = ("tp", "tp_without_mesh")
"""The layouts whose runs also unload the adapter and load the saved one back."""
CONFIGS = {
    "R": {"variant": "R", "r": 4, "num_experts": 4, "top_k": 2, "init_weights": False},
    "R_aux": {"variant": "R", "r": 4, "num_experts": 4, "top_k": 2, "init_weights": False},
    "E": {"variant": "E", "r": 4, "init_weights": False},
    "D": {"variant": "D", "r": 4, "num_experts": 2, "init_weights": False},
    "S": {"variant": "S", "r": 4, "init_weights": False},
    "R_r3": {"variant": "R", "r": 3, "num_experts": 4, "top_k": 2, "init_weights": False},  # r % tp_size != 0
}
TRAINING_SEED = 7


def batches() -> torch.Tensor:
    """The global batch of every step (STEPS, GLOBAL_BATCH, 8), the same in every process."""
    return torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))


def load_base(base: str, layout: str, variant: str) -> torch.nn.Module:
    """The saved base, sharded as LAYOUT says. For the ``R_aux`` run with its router aux loss on, so that PERFT-R's
    is added to the loss and trained too (only where ranks share a batch: the load-balancing loss of a batch is not
    the mean of its slices' losses, under data parallelism neither for the base nor for PERFT)."""
    settings = LAYOUTS[layout]
    distributed = {} if settings is None else {"distributed_config": DistributedConfig(**settings)}
    return AutoModelForCausalLM.from_pretrained(base, output_router_logits=variant == "R_aux", **distributed)


def data_parallel_slice(tokens: torch.Tensor, layout: str) -> torch.Tensor:
    """This rank's share of the global batch: its FSDP slice, all of it otherwise. The ranks of a TP group share a
    slice: Transformers' dense mesh is (pp, dp_replicate, fsdp, tp), TP innermost."""
    settings = LAYOUTS[layout] or {}
    parts = settings.get("fsdp_size", 1)
    if parts == 1:
        return tokens
    per_rank = tokens.shape[0] // parts
    data_rank = dist.get_rank() // settings.get("tp_size", 1)
    return tokens[data_rank * per_rank : (data_rank + 1) * per_rank]


def adapter_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole gradients (gathered for sharded tensors: every rank calls this)."""
    gradients = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            gradient = parameter.grad.detach()
            gradients[name] = gradient.full_tensor() if isinstance(gradient, DTensor) else gradient.clone()
    return gradients


def adapter_elements_held(model: torch.nn.Module) -> dict[str, int]:
    """Elements of each adapter tensor stored on this rank (its shard for a DTensor)."""
    held = {}
    for name, parameter in model.named_parameters():
        if ".perft_" in name:
            held[name] = (parameter.to_local() if isinstance(parameter, DTensor) else parameter).numel()
    return held


def adapter_flops(model: torch.nn.Module, tokens: torch.Tensor, layout: str) -> int:
    """FLOPs this rank spends on the adapter in one forward: with it minus without it.

    Under TP with EP the forward runs as in training (gradients on, into the input embeddings), as the runs
    themselves train; each TP rank computes R, D and S on its token rows whichever dispatch Transformers runs."""
    settings = LAYOUTS[layout] or {}
    as_in_training = settings.get("tp_size", 1) > 1 and settings.get("ep_size", 1) > 1
    inputs = {"input_ids": tokens}
    if as_in_training:
        inputs = {"inputs_embeds": model.get_input_embeddings()(tokens).detach().requires_grad_()}
    counts = []
    for adapter_off in (False, True):
        with torch.set_grad_enabled(as_in_training), FlopCounterMode(display=False) as counter:
            if adapter_off:
                with model.disable_adapter():
                    model(**inputs)
            else:
                model(**inputs)
        counts.append(counter.get_total_flops())
    return counts[0] - counts[1]


COLLECTIVE_KINDS = ("gather", "reduce", "scatter", "all_to_all", "alltoall", "broadcast")


class CountingCollectives(TorchDispatchMode):
    """Count the c10d collective ops (forward and backward) run inside the mode, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and any(kind in func.name() for kind in COLLECTIVE_KINDS):
            self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


def collectives_of_a_step(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, dict[str, int]]:
    """The collectives of one training forward and backward (gradients on into the input embeddings, so every MoE
    block takes AllToAllEP), with R, D and S on each TP rank's token rows as PERFT runs them ("rows") and with the
    blocks adding them on all rows instead ("replicated", the token-row owners withdrawn for the step)."""
    blocks = [module for module in model.modules() if isinstance(module, PerftMoeBlock)]
    owners = [dict(block.term_owners) for block in blocks]
    embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_()
    calls = {}
    model.train()
    for mode in ("rows", "replicated"):
        if mode == "replicated":
            for block, owned in zip(blocks, owners, strict=True):
                block.term_owners = {name: owner for name, owner in owned.items() if owner != token_slices.OWNER}
        with CountingCollectives() as counting:
            model(inputs_embeds=embeddings, labels=tokens).loss.backward()
        calls[mode] = dict(counting.calls)
    for block, owned in zip(blocks, owners, strict=True):
        block.term_owners = owned
    model.zero_grad(set_to_none=True)
    model.eval()
    return calls


def train(model: torch.nn.Module, layout: str, tokens: torch.Tensor) -> dict:
    model.train()
    torch.manual_seed(TRAINING_SEED)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    record = {}
    for step in range(STEPS):
        batch = data_parallel_slice(tokens[step], layout)
        model(input_ids=batch, labels=batch).loss.backward()
        if step == 0:
            record["gradients"] = adapter_gradients(model)
        optimiser.step()
        optimiser.zero_grad()
    model.eval()  # what follows compares logits, which Mixtral's router jitter would change in training
    return record


def unloaded_record(model: PeftModel, tokens: torch.Tensor, base_logits: torch.Tensor) -> tuple[dict, torch.nn.Module]:
    """How many experts modules run PERFT's TP forward before and after ``unload()``, and whether the unloaded
    model gives the base model's logits again; and that unloaded model."""

    def wrapped(module: torch.nn.Module) -> int:
        return sum(TensorParallelExperts.of(child) is not None for child in module.modules())

    before = wrapped(model)
    unloaded = model.unload()
    with torch.no_grad():
        same = torch.allclose(unloaded(input_ids=tokens).logits, base_logits, rtol=1e-5, atol=1e-6)
    return {"wrapped_before": before, "wrapped_after": wrapped(unloaded), "base_logits_again": same}, unloaded


@contextlib.contextmanager
def counting_gathers() -> Iterator[list[int]]:
    """Count ``DTensor.full_tensor`` calls (one collective gather each) inside the block."""
    calls = [0]
    original = DTensor.full_tensor

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    DTensor.full_tensor = counted
    try:
        yield calls
    finally:
        DTensor.full_tensor = original


def without_mesh_manager(model: torch.nn.Module) -> None:
    """The model's ``_mesh_manager``, where PERFT reads the TP mesh, gone as if Transformers had renamed it."""
    model._mesh_manager = None


FORCED_UPSTREAM_CHANGES = {"tp_without_mesh": TENSOR_PARALLEL_SPLIT}
"""The layouts run with a private Transformers detail changed, and the PERFT feature that then falls back."""


def run_case(layout: str, base: str, variant: str, output: str, adapter: str | None = None) -> None:
    """One run (see the module docstring), in a process group already set up unless LAYOUT is ``single``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = record_case(layout, base, variant, output, adapter, rank)
    upstream = [str(warning.message) for warning in caught if issubclass(warning.category, UpstreamDetailWarning)]
    record["upstream_warnings"] = upstream
    if rank == 0:
        torch.save(record, output)
    elif adapter is None:
        torch.save(record, f"{output}.rank{rank}")
    # Free the sharded tensors while the process group still exists (torch 2.13 + gloo can abort at exit otherwise).
    gc.collect()
    if dist.is_initialized():
        dist.barrier()


def record_case(layout: str, base: str, variant: str, output: str, adapter: str | None, rank: int) -> dict:
    """The record of one run (see the module docstring)."""
    base_model = load_base(base, layout, variant)
    if layout == "tp_without_mesh":
        without_mesh_manager(base_model)
    tokens = batches()
    torch.manual_seed(rank)
    if adapter is not None:
        model = PeftModel.from_pretrained(base_model, adapter)
        with torch.no_grad():
            record = {"logits": model(input_ids=tokens[0]).logits}
    else:
        # Only where needed: under FSDP a forward before get_peft_model would set up FSDP's unsharded parameters
        # while the base still requires gradients, and the frozen weights would then get gradients.
        if layout in TP_ALONE:
            with torch.no_grad():
                base_logits = base_model(input_ids=tokens[0]).logits
        model = get_peft_model(base_model, PerftConfig(**CONFIGS[variant]))
        record = {"initial": gathered_adapter_state_dict(model), "held": adapter_elements_held(model)}
        with torch.no_grad():
            record["logits"] = model(input_ids=tokens[0]).logits
        record["adapter_flops"] = adapter_flops(model, tokens[0], layout)
        if layout == "tp_ep_sharded" and variant != "E":
            record["collectives"] = collectives_of_a_step(model, tokens[0])
        record.update(train(model, layout, tokens))
        record["trained"] = gathered_adapter_state_dict(model)
        with counting_gathers() as gathers:
            model.save_pretrained(f"{output}.adapter", is_main_process=rank == 0)
        record["gathers_during_save"] = gathers
        if layout in TP_ALONE:
            record["unloaded"], model = unloaded_record(model, tokens[0], base_logits)
            dist.barrier()  # rank 0 has written the adapter
            model = PeftModel.from_pretrained(model, f"{output}.adapter")
            with torch.no_grad():
                record["reloaded_logits"] = model(input_ids=tokens[0]).logits
    return record


CASE_TIMEOUT_S = 150
"""A case still running after this long prints every rank's stack and exits instead of stalling."""


def run_cases(cases: tuple[str, ...]) -> None:
    """Each ``LAYOUT,BASE,VARIANT,OUTPUT[,ADAPTER]`` case in turn, each under its own hang timeout."""
    for case in cases:
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        run_case(*case.split(","))


def main(*cases: str) -> None:
    from lifecycle import leave_process_group  # by its file name, as a script (the tests import this module too)

    dist.init_process_group("gloo")
    run_cases(cases)
    leave_process_group()


if __name__ == "__main__":
    from lifecycle import run_failing_on_hang

    run_failing_on_hang(main, seconds=CASE_TIMEOUT_S)
