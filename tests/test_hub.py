"""Hub sharing of PERFT adapters, with no network: uploads are caught at the HTTP layer, loads come from a local cache.

`push_to_hub` runs huggingface_hub's real commit-building code (create_repo, preupload, commit); only the HTTP
transport is replaced by an `httpx2.MockTransport` that records the requests and answers as the Hub would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import build_tiny
from huggingface_hub import ModelCard, constants, scan_cache_dir
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from peft import LoraConfig, PeftModel, get_peft_model

from peft_perft import PerftConfig
from peft_perft.hub.model_card import CARD_MARKER

REPO_ID = "perft-tests/tiny-perft-r"
COMMIT_SHA = "0123456789abcdef0123456789abcdef01234567"
AGENT_REGISTRY_PATH = "/api/agent-harnesses"


class FakeHub:
    """Answers the Hub endpoints a push uses and keeps every request for the test to inspect."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.committed: dict[str, bytes] = {}
        self.commit_header: dict | None = None

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO_ID}", "name": REPO_ID})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            return self._commit(request)
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": f"{path} not found"})

    def _commit(self, request: httpx2.Request) -> httpx2.Response:
        """Decode the NDJSON commit: a header line, then one line per file with its base64 content."""
        for line in request.content.decode().splitlines():
            entry = json.loads(line)
            if entry["key"] == "header":
                self.commit_header = entry["value"]
            elif entry["key"] == "file":
                self.committed[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
        return httpx2.Response(
            200, json={"commitUrl": f"https://huggingface.co/{REPO_ID}/commit/{COMMIT_SHA}", "commitOid": COMMIT_SHA}
        )

    def paths(self) -> list[str]:
        """The endpoints called, without huggingface_hub's once-a-day fetch of its user-agent registry."""
        return [request.url.path for request in self.requests if request.url.path != AGENT_REGISTRY_PATH]


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """huggingface_hub's own client (with its request hook, which enforces offline mode) on a fake transport."""
    hub = FakeHub()
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub.handle),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
        )
    )
    yield hub
    huggingface_hub.set_client_factory(default_client_factory)


def perft_model(variant: str = "R") -> PeftModel:
    """A tiny OLMoE with a PERFT adapter whose B is random, so the adapter changes the output."""
    return get_peft_model(build_tiny(), PerftConfig(variant=variant, r=4, init_weights=False))


def saved_files(model: PeftModel, directory: Path) -> dict[str, bytes]:
    model.save_pretrained(directory)
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_push_uploads_exactly_what_save_pretrained_writes(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = perft_model()
    local = saved_files(model, tmp_path / "adapter")

    model.push_to_hub(REPO_ID, token="hf_test_token")

    assert (
        sorted(fake_hub.committed) == sorted(local) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    )
    assert fake_hub.committed["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert fake_hub.committed["adapter_config.json"] == local["adapter_config.json"]
    # The card is the same one, except that its loading snippet names the Hub repo instead of a placeholder path.
    assert str(tmp_path) not in local["README.md"].decode()
    expected_card = local["README.md"].decode().replace("path/to/this/adapter", REPO_ID)
    assert fake_hub.committed["README.md"].decode() == expected_card
    assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in expected_card
    assert fake_hub.paths() == [
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO_ID}/preupload/main",
        f"/api/models/{REPO_ID}/commit/main",
    ]
    api_requests = [request for request in fake_hub.requests if request.url.path in fake_hub.paths()]
    assert {request.headers.get("authorization") for request in api_requests} == {"Bearer hf_test_token"}


def test_pushed_card_carries_hub_metadata_and_user_tags(fake_hub: FakeHub) -> None:
    perft_model(variant="E").push_to_hub(REPO_ID, token="hf_test_token", tags=["my-run"], commit_message="first push")

    card = ModelCard(fake_hub.committed["README.md"].decode())
    assert card.data.library_name == "peft"
    assert {"perft", "moe", "peft", "perft-e", "my-run"} <= set(card.data.tags)
    assert CARD_MARKER in card.text
    assert fake_hub.commit_header["summary"] == "first push"


def test_other_peft_methods_keep_peft_push(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A LoRA model goes through peft/transformers' own push, which this package must not change."""
    model = get_peft_model(build_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    local = saved_files(model, tmp_path / "lora")

    model.push_to_hub(REPO_ID, token="hf_test_token")

    assert sorted(fake_hub.committed) == sorted(local)
    assert fake_hub.committed["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert CARD_MARKER not in fake_hub.committed["README.md"].decode()


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main -> commit."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT_SHA
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT_SHA)
    for name, content in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in offline mode; huggingface_hub reads its constants at import, so patch them too."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_loads_a_repo_id_from_the_offline_cache(
    offline_cache: Path, fake_hub: FakeHub, tmp_path: Path, tokens: torch.Tensor
) -> None:
    trained = perft_model().eval()
    populate_hub_cache(offline_cache, REPO_ID, saved_files(trained, tmp_path / "adapter"))
    cached = scan_cache_dir(offline_cache)
    assert [repo.repo_id for repo in cached.repos] == [REPO_ID] and not cached.warnings

    loaded = PeftModel.from_pretrained(build_tiny(), REPO_ID).eval()

    with torch.no_grad():
        expected = trained(tokens).logits
        base = build_tiny()(tokens).logits
        actual = loaded(tokens).logits
    assert torch.equal(actual, expected)
    assert not torch.allclose(actual, base)
    assert loaded.peft_config["default"].variant == "R"
    assert fake_hub.requests == []


def test_offline_load_of_an_uncached_repo_fails_without_network(offline_cache: Path, fake_hub: FakeHub) -> None:
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(build_tiny(), "perft-tests/not-cached")
    assert fake_hub.requests == []
