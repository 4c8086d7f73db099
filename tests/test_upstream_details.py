"""The private Transformers details PERFT's parallel code relies on: present on the release it was checked on
(`CHECKED_TRANSFORMERS_VERSION`, 5.25.0), and, when one is missing, one warning per process that names the feature,
the checked and the installed release, and the replicated adapter PERFT falls back to.

The fallback's results under real sharding are checked by tests/test_sharded_load.py (the ``tp_without_mesh``
layout), which also asserts that the runs on the installed release warn nothing.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version

import pytest
from conftest import build_tiny
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from peft_perft import PerftConfig
from peft_perft.parallel import tensor_parallel
from peft_perft.parallel.tensor_parallel import (
    CHECKED_TRANSFORMERS_VERSION,
    TENSOR_PARALLEL_SPLIT,
    UpstreamDetailWarning,
    find_tensor_parallel_mesh,
)


def upstream_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught if issubclass(warning.category, UpstreamDetailWarning)]


def assert_names_feature_and_releases(message: str, feature: str, detail: str) -> None:
    assert feature in message
    assert detail in message
    assert f"checked on transformers {CHECKED_TRANSFORMERS_VERSION}" in message
    assert f"installed transformers {version('transformers')}" in message
    assert "replicated" in message


@pytest.fixture
def nothing_warned_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not warned about any feature yet (the warnings are once per process)."""
    monkeypatch.setattr(tensor_parallel, "_WARNED_FEATURES", set())


def test_a_tensor_parallel_model_without_transformers_mesh_is_warned_once_and_stays_replicated(
    nothing_warned_yet: None,
) -> None:
    """A model whose config says tp_size=2 but that has no ``_mesh_manager`` (as if Transformers had renamed it):
    two adapters, one warning, both replicated (plain tensors, not DTensors)."""
    model = build_tiny("olmoe")
    model.config.distributed_config = DistributedConfig(tp_size=2)
    assert getattr(model, "_mesh_manager", None) is None
    config = {"variant": "R", "r": 4, "num_experts": 4, "top_k": 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, PerftConfig(**config))
        peft_model.add_adapter("second", PerftConfig(**config))
        assert find_tensor_parallel_mesh(model) is None
    [message] = upstream_warnings(caught)
    assert_names_feature_and_releases(message, TENSOR_PARALLEL_SPLIT, "model._mesh_manager.get_mesh('tp')")
    adapter_tensors = [p for name, p in peft_model.named_parameters() if ".perft_" in name]
    assert len(adapter_tensors) == 2 * 3 * model.config.num_hidden_layers  # A, B and router of 2 adapters
    assert not any(isinstance(tensor, DTensor) for tensor in adapter_tensors)


def test_a_model_without_distributed_config_warns_nothing(nothing_warned_yet: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(build_tiny("olmoe"), PerftConfig(variant="R", r=4, num_experts=4, top_k=2))
    assert upstream_warnings(caught) == []
