"""The routing pictures stay readable and comparable at real scale (64-256 experts, 16-58 layers)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from peft_perft.monitor.pictures import RATIO_LIMIT, relative_loads
from peft_perft.monitor.stats import RouterStats, RoutingReport
from peft_perft.monitor.trace import RoutingTrace, _token_texts


def report_at_shape(num_layers: int, num_experts: int, top_k: int) -> RoutingReport:
    """Synthetic statistics: in each layer expert 0 gets every token, expert 1 none, the rest share the remainder."""
    rest = (top_k - 1) / (num_experts - 2)
    load = [1.0, 0.0, *([rest] * (num_experts - 2))]
    routers = [
        RouterStats(
            layer, f"model.layers.{layer}.mlp", "base", None, num_experts, top_k, 900.0, load, 0.9, 0.5, 1.0, [1]
        )
        for layer in range(num_layers)
    ]
    return RoutingReport(routers=routers, forward_passes=3, source="3 held-out batches")


def test_relative_loads_share_one_scale_whatever_the_router() -> None:
    # Balanced is 0 whatever the expert count; 8x and more saturate; a dead expert sits at the cold end.
    assert relative_loads([0.125, 1.0, 0.0, 0.5], balanced=0.125) == [0.0, 3.0, -3.0, 2.0]
    assert relative_loads([0.5], balanced=0.5) == [0.0]
    assert relative_loads([0.25 / RATIO_LIMIT / 2], balanced=0.25) == [-math.log2(RATIO_LIMIT)]


@pytest.mark.parametrize(("layers", "experts"), [(16, 64), (58, 256)])  # OLMoE's and DeepSeek-V3's shapes
def test_heatmaps_stay_readable_and_say_what_they_cover(tmp_path: Path, layers: int, experts: int) -> None:
    import matplotlib.pyplot as plt

    figures = []
    original_close = plt.close
    plt.close = figures.append
    try:
        (path,) = report_at_shape(layers, experts, top_k=8).save_heatmaps(tmp_path)
    finally:
        plt.close = original_close
    (axis,) = [axis for axis in figures[0].axes if axis.get_xlabel().startswith("expert")]
    assert "3 held-out batches: 3 forward passes, 900 tokens per layer" in axis.get_title()
    assert f"top-8 of {experts}" in axis.get_title()
    assert len(axis.get_xticks()) <= 32 and len(axis.get_yticks()) <= 32  # ticks thinned, not overprinted
    assert not axis.texts  # too many cells to write numbers into
    image = axis.get_images()[0]
    assert image.get_clim() == (-3.0, 3.0)  # the fixed scale, not this picture's own maximum
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width <= 2600 and height <= 3000
    assert width / experts >= 7 and height / layers >= 10  # every cell stays visible
    original_close(figures[0])


def test_trace_shows_byte_level_tokens_as_text(tmp_path: Path) -> None:
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(["the experts route every token"] * 10, vocab_size=300, special_tokens=["<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, pad_token="<pad>")
    ids = tokenizer("route every token")["input_ids"]
    assert any(token.startswith("Ġ") for token in tokenizer.convert_ids_to_tokens(ids))
    texts = _token_texts(ids, tokenizer)
    assert "".join(texts) == "route every token" and not any("Ġ" in text for text in texts)

    rows = [
        {
            "example": 0,
            "position": position,
            "token_id": token_id,
            "token": None,
            "text": text,
            "layer": layer,
            "module": f"model.layers.{layer}.mlp",
            "adapter": "default",
            "variant": "E",
            "base_experts": [position % 64, 63],
            "base_weights": [0.75, 0.25],
            "perft_experts": [position % 64, 63],
            "perft_weights": [0.75, 0.25],
        }
        for position, (token_id, text) in enumerate(zip(ids, texts, strict=True))
        for layer in range(16)
    ]
    import matplotlib.pyplot as plt

    figures = []
    original_close = plt.close
    plt.close = figures.append
    try:
        RoutingTrace(rows).plot(tmp_path / "trace.png")
    finally:
        plt.close = original_close
    axis = figures[0].axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == [text.replace(" ", "\u2423") for text in texts]
    assert {text.get_text() for text in axis.texts} == {str(position % 64) for position in range(len(ids))}
    assert axis.get_images()[0].get_array()[0, 0] == pytest.approx(0.75)  # the top expert's share of the weight
    original_close(figures[0])
