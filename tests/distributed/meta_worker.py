"""FSDP2's meta-device flow with PERFT, or its one-process reference; launched by tests/test_meta_device_fsdp2.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 meta_worker.py meta OUTPUT VARIANT [VARIANT ...]
       python meta_worker.py reference OUTPUT VARIANT [VARIANT ...]
``meta`` runs ``prepare_on_meta`` as docs/big_models.md gives it (read from that page) on the tiny OLMoE, each rank
training on its half of every batch; ``reference`` builds the same model on the CPU and calls ``get_peft_model``
after the same seed, on the whole batch. Both write, per variant, the initial adapter, the first forward's logits,
the first step's adapter gradients, the adapter after the steps and a ``save_pretrained`` directory, then the
logits of that saved adapter loaded back (``load_perft_adapter`` into a second model from the recipe, or
``PeftModel.from_pretrained`` in one process).
"""

from __future__ import annotations

import faulthandler
import gc
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny, tiny_olmoe_config  # noqa: E402

from peft_perft import PerftConfig  # noqa: E402

RECIPE_PAGE = Path(__file__).resolve().parents[2] / "docs" / "big_models.md"
SEED = 11
GLOBAL_BATCH = 4
STEPS = 3
CASE_TIMEOUT_S = 150


def documented_recipe() -> dict:
    """The namespace of the page's Python block that defines ``prepare_on_meta``, executed as a user would copy it."""
    bodies = re.findall(r"^```python\n(.*?)^```", RECIPE_PAGE.read_text(), re.M | re.S)
    recipe = next(body for body in bodies if "def prepare_on_meta(" in body)
    namespace: dict = {}
    exec(compile(recipe, str(RECIPE_PAGE), "exec"), namespace)  # noqa: S102 - the documented code is the test
    return namespace


def perft_config(variant: str) -> PerftConfig:
    routing = {"num_experts": 3, "top_k": 1} if variant == "R" else {"num_experts": 2} if variant == "D" else {}
    return PerftConfig(variant=variant, r=4, **routing)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def adapter_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p) for name, p in model.named_parameters() if ".perft_" in name}


def gathered_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks of a tensor, concatenated in rank order (the one process's whole batch)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def build(mode: str, variant: str) -> torch.nn.Module:
    """The adapted tiny OLMoE: through the documented meta-device recipe, or built whole on the CPU."""
    if mode == "reference":
        base = build_tiny()
        torch.manual_seed(SEED)
        return get_peft_model(base, perft_config(variant))
    checkpoint = build_tiny().state_dict() if dist.get_rank() == 0 else {}
    prepare = documented_recipe()["prepare_on_meta"]
    return prepare(tiny_olmoe_config(), perft_config(variant), checkpoint, "cpu", torch.float32, SEED)


def run_case(mode: str, variant: str, output: Path) -> None:
    model = build(mode, variant)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    if mode == "meta":
        assert all(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 must shard every parameter"
    record = {"initial": adapter_of(model)}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tokens = torch.randint(3, 64, (STEPS, GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(5))
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank = GLOBAL_BATCH // ranks
    model.train()
    for step in range(STEPS):
        batch = tokens[step, rank * per_rank : (rank + 1) * per_rank]
        output_step = model(input_ids=batch, labels=batch)
        if step == 0:
            record["logits"] = gathered_rows(output_step.logits.detach())
        output_step.loss.backward()
        if step == 0:
            record["gradients"] = {n: full(p.grad) for n, p in model.named_parameters() if ".perft_" in n}
        optimiser.step()
        optimiser.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    record["trained"] = {name: tensor.clone() for name, tensor in state.items() if ".perft_" in name}
    model.save_pretrained(output / f"{variant}.adapter", is_main_process=rank == 0)
    del model, optimiser, state, output_step
    record["reloaded_logits"] = reloaded_logits(mode, variant, output / f"{variant}.adapter", rank, per_rank)
    if rank == 0:
        torch.save(record, output / f"{variant}.pt")
    # Free the sharded tensors while the process group still exists (see tests/distributed/train_worker.py).
    gc.collect()


def reloaded_logits(mode: str, variant: str, adapter: Path, rank: int, per_rank: int) -> torch.Tensor:
    """The saved adapter loaded back: into a second model from the documented recipe (``load_perft_adapter``), or
    with ``PeftModel.from_pretrained`` in one process; its logits on a fresh batch."""
    batch = torch.randint(3, 64, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(9))
    if mode == "reference":
        model = PeftModel.from_pretrained(build_tiny(), adapter)
    else:
        if dist.get_world_size() > 1:
            dist.barrier()  # rank 0 has written the file
        model = build(mode, variant)
        saved = load_file(adapter / "adapter_model.safetensors") if rank == 0 else {}
        documented_recipe()["load_perft_adapter"](model, saved)
    with torch.no_grad():
        logits = gathered_rows(model(input_ids=batch[rank * per_rank : (rank + 1) * per_rank]).logits)
    del model
    gc.collect()
    return logits


def main(mode: str, output: str, variants: list[str]) -> None:
    if mode == "meta":
        dist.init_process_group("gloo")
    for variant in variants:
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        run_case(mode, variant, Path(output))
        faulthandler.cancel_dump_traceback_later()
    if mode == "meta":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
