"""Ablate page figures: the downstream attention map and a head's before / after / change view."""

from __future__ import annotations

import numpy as np
import pytest

from components.ablation import (
    change_grid,
    make_attention_change_heatmap,
    make_delta_loss_figure,
    make_layer_sweep_heatmap,
    make_loss_figure,
    make_pattern_comparison,
    make_sweep_heatmap,
    parse_change_click,
)
from tests.components.test_heatmaps import random_causal, tokens
from tests.conftest import ATOL
from tests.figures import as_figure, colorscales


def test_change_grid_puts_downstream_layers_in_their_rows_and_blanks_the_rest():
    change = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)

    grid = change_grid(change, (2, 3), 4)

    assert grid.shape == (4, 2)
    assert np.isnan(grid[:2]).all()
    np.testing.assert_allclose(grid[2:], change, atol=ATOL)
    with pytest.raises(ValueError, match="2 downstream layers"):
        change_grid(change[:1], (2, 3), 4)


def test_a_click_on_the_change_map_names_its_layer_and_head():
    grid = change_grid(np.full((1, 3), 0.5, dtype=np.float32), (1,), 2)
    figure = make_attention_change_heatmap(grid, selected=(1, 2))
    figure = as_figure(figure)
    x, y = figure.data[0].x, figure.data[0].y

    assert parse_change_click({"points": [{"x": x[2], "y": y[1]}]}) == (1, 2)
    assert parse_change_click({"points": [{"x": "key", "y": y[1]}]}) is None
    assert parse_change_click(None) is None
    frame = figure.layout.shapes[0]
    assert (frame.x0, frame.x1, frame.y0, frame.y1) == (1.5, 2.5, 0.5, 1.5)


def test_pattern_comparison_shows_before_after_and_their_difference():
    rng = np.random.default_rng(1)
    before, after = random_causal(rng, 2, 7)

    figure = make_pattern_comparison(before, after, tokens(7), title="L1H0")
    figure = as_figure(figure)

    shown = [np.asarray(trace.z, dtype=np.float32) for trace in figure.data]
    causal = np.tril(np.ones((7, 7), dtype=bool))
    for z, expected in zip(shown, [before, after, after - before], strict=True):
        np.testing.assert_allclose(z[causal], expected[causal], atol=ATOL)
        assert np.isnan(z[~causal]).all()
    # The change has its own symmetric colour scale; before and after share 0-1.
    peak = float(np.abs(after - before).max())
    assert figure.layout.coloraxis2.cmax == pytest.approx(peak) == -figure.layout.coloraxis2.cmin
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (0.0, 1.0)


def test_long_patterns_are_blocked_and_the_change_keeps_its_sign():
    n_pos = 300
    before = np.tril(np.ones((n_pos, n_pos), dtype=np.float32))
    before /= before.sum(-1, keepdims=True)
    after = before.copy()
    after[200, 0] -= 0.5  # a fall, larger than any rise in the same block
    after[200, 1] += 0.1

    figure = make_pattern_comparison(before, after, tokens(n_pos), max_side=100)
    figure = as_figure(figure)

    delta = np.asarray(figure.data[2].z, dtype=np.float32)
    assert delta.shape == (100, 100)
    assert delta[200 // 3, 0] == pytest.approx(-0.5, abs=ATOL)
    assert "blocks of 3 tokens" in figure.layout.title.text


def test_pattern_comparison_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match the 4 tokens"):
        make_pattern_comparison(np.eye(3), np.eye(3), tokens(4))


@pytest.mark.parametrize("dark", [False, True])
def test_every_ablation_figure_passes_plotly_validation(dark):
    """The builders skip validation for speed; a validated copy must accept every property."""
    rng = np.random.default_rng(2)
    before, after = random_causal(rng, 2, 6)
    loss = rng.random(5).astype(np.float32)
    figures = [
        make_loss_figure(tokens(6), loss, loss + 1, loss > 0.5, title="t", dark=dark),
        make_delta_loss_figure(tokens(6), loss - 0.5, title="t", dark=dark),
        make_sweep_heatmap(rng.random((2, 3)), title="t", dark=dark),
        make_layer_sweep_heatmap(rng.random(2), rng.random(2), title="t", dark=dark),
        make_attention_change_heatmap(
            change_grid(rng.random((1, 3)), (1,), 2), selected=(1, 0), title="t", dark=dark
        ),
        make_pattern_comparison(before, after, tokens(6), title="t", dark=dark),
    ]

    for figure in figures:
        as_figure(figure)  # raises ValueError on an unknown or invalid property
        assert not any(isinstance(scale, str) for scale in colorscales(figure)), (
            "plotly.js knows other colour scale names than plotly.py"
        )
