"""Figure builders: values, labels, downsampling and size on the wire."""

from __future__ import annotations

import numpy as np
import plotly.io as pio
import pytest
from dash._utils import to_json

from components.heatmaps import (
    block_max,
    block_starts,
    downsample_attention,
    make_attention_heatmap,
    make_empty_figure,
    make_head_grid,
    make_layer_head_panels,
    make_model_overview,
    overview_starts,
    parse_overview_click,
    parse_panel_click,
)
from components.shell import DARK_TEMPLATE, LIGHT_TEMPLATE, TRACE_TYPES, load_figure_templates
from tests.conftest import ATOL
from tests.figures import as_figure, colorscales

MB = 1_000_000


def random_causal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Softmax of random scores under a causal mask, ``[*shape[:-1], n, n]`` float32."""
    n_pos = shape[-1]
    scores = rng.normal(size=(*shape[:-1], n_pos, n_pos)).astype(np.float32) * 3
    scores = np.where(np.tril(np.ones((n_pos, n_pos), dtype=bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def tokens(n_pos: int) -> list[str]:
    return ["<|endoftext|>"] + [f" w{i}" for i in range(1, n_pos)]


def test_block_max_takes_the_largest_value_of_each_block():
    array = np.arange(25, dtype=np.float32).reshape(5, 5)
    starts = block_starts(5, 2)  # blocks of 3: [0, 1, 2], [3, 4]

    assert starts.tolist() == [0, 3]
    np.testing.assert_array_equal(block_max(array, starts, starts), [[12, 14], [22, 24]])


def test_short_prompts_are_not_downsampled_and_keep_the_upper_triangle_empty():
    pattern = random_causal(np.random.default_rng(0), 6)

    shown = downsample_attention(pattern, block_starts(6, 384))

    causal = np.tril(np.ones((6, 6), dtype=bool))
    np.testing.assert_allclose(shown[causal], pattern[causal], atol=ATOL)
    assert np.isnan(shown[~causal]).all()


def test_head_heatmap_labels_every_token_and_escapes_markup():
    words = ["<|endoftext|>", "<b>", " x", "\n"]
    pattern = random_causal(np.random.default_rng(1), 4)

    figure = make_attention_heatmap(pattern, words)
    figure = as_figure(figure)

    assert list(figure.data[0].x) == ["0 &lt;|endoftext|&gt;", "1 &lt;b&gt;", "2 ·x", "3 ↵"]
    assert list(figure.layout.xaxis.ticktext) == ["&lt;|endoftext|&gt;", "&lt;b&gt;", "·x", "↵"]
    assert "weight %{z:.3f}" in figure.data[0].hovertemplate


def test_long_prompt_head_view_uses_blocks_and_fits_in_one_megabyte():
    n_pos = 1024
    pattern = random_causal(np.random.default_rng(2), n_pos)

    figure = make_attention_heatmap(pattern, tokens(n_pos))
    figure = as_figure(figure)
    size = len(to_json(figure))

    z = np.asarray(figure.data[0].z)
    assert z.shape == (342, 342)  # blocks of 3 tokens
    assert np.nanmax(z[100]) == pytest.approx(pattern[300:303].max(), abs=ATOL)
    assert figure.data[0].y[100].startswith("300–302 ")
    assert "blocks of 3 tokens" in figure.layout.title.text
    assert size <= MB, f"one head view is {size:,} bytes"


def test_model_overview_of_a_gpt2_small_shaped_model_fits_in_two_megabytes():
    n_layers, n_heads, n_pos = 12, 12, 1024
    starts = overview_starts(n_pos, n_layers * n_heads)
    rng = np.random.default_rng(3)
    thumbnails = np.stack(
        [downsample_attention(random_causal(rng, n_heads, n_pos), starts) for _ in range(n_layers)]
    )

    figure = make_model_overview(thumbnails, starts, selected=(3, 4))
    figure = as_figure(figure)
    size = len(to_json(figure))

    tile = len(starts)
    assert np.asarray(figure.data[0].z).shape == (n_layers * tile, n_heads * tile)
    assert size <= 2 * MB, f"the overview is {size:,} bytes"


def test_overview_click_labels_name_the_layer_and_head_of_their_tile():
    starts = block_starts(8, 8)
    thumbnails = np.zeros((2, 3, 8, 8), dtype=np.float32)

    figure = make_model_overview(thumbnails, starts)
    figure = as_figure(figure)
    x, y = figure.data[0].x, figure.data[0].y

    assert parse_overview_click({"points": [{"x": x[2 * 8 + 5], "y": y[1 * 8 + 7]}]}) == (1, 2)
    assert parse_overview_click({"points": [{"x": 3, "y": 4}]}) is None
    assert parse_overview_click(None) is None


def test_head_grid_puts_head_h_in_trace_h():
    patterns = random_causal(np.random.default_rng(4), 5, 7)

    figure = make_head_grid(patterns, layer=2, selected_head=4)
    figure = as_figure(figure)

    assert len(figure.data) == 5
    for head, trace in enumerate(figure.data):
        assert trace.hovertemplate.startswith(f"L2 H{head}<br>")
        causal = np.tril(np.ones((7, 7), dtype=bool))
        np.testing.assert_allclose(np.asarray(trace.z)[causal], patterns[head][causal], atol=ATOL)
    assert figure.layout.shapes[0].xref == "x5 domain"


def test_layer_head_panels_put_layers_down_and_heads_across():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)

    figure = make_layer_head_panels([("a", values), ("b", -values)], selected=(1, 2))
    figure = as_figure(figure)

    np.testing.assert_array_equal(figure.data[1].z, -values)
    assert parse_panel_click({"points": [{"x": 2, "y": 1}]}) == (1, 2)
    assert parse_panel_click({"points": [{}]}) is None
    assert len(figure.layout.shapes) == 2  # one frame per panel


@pytest.mark.parametrize("dark", [False, True])
def test_every_figure_passes_plotly_validation(dark):
    """The builders skip validation for speed; a validated copy must accept every property."""
    rng = np.random.default_rng(5)
    pattern = random_causal(rng, 3, 9)
    starts = block_starts(9, 9)
    figures = [
        make_empty_figure("nothing", dark=dark),
        make_attention_heatmap(pattern[0], tokens(9), title="t", dark=dark, max_side=4),
        make_head_grid(pattern, layer=0, selected_head=1, dark=dark),
        make_model_overview(downsample_attention(pattern[None], starts), starts, dark=dark),
        make_layer_head_panels([("a", np.ones((2, 3)))] * 3, columns=2, dark=dark),
    ]

    for figure in figures:
        as_figure(figure)  # raises ValueError on an unknown or invalid property
        assert not any(isinstance(scale, str) for scale in colorscales(figure)), (
            "plotly.js knows other colour scale names than plotly.py"
        )


def test_figure_templates_style_only_the_trace_types_memlens_draws():
    load_figure_templates()

    for name in (LIGHT_TEMPLATE, DARK_TEMPLATE):
        template = pio.templates[name]
        assert set(template.data.to_plotly_json()) == set(TRACE_TYPES)
        assert template.layout.paper_bgcolor  # the Bootstrap look is kept
