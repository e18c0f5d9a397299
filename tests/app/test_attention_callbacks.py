"""Attention page callbacks called as plain functions, on the embedded demo model.

Dash's ``callback`` decorator registers a function and hands it back unchanged, so the page's
callbacks are called here exactly as Dash calls them, minus the HTTP round trip.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import numpy as np
import pytest
from dash import no_update
from hypothesis import given, settings
from hypothesis import strategies as st

import analysis
from analysis.attention_stats import head_stats, token_flow
from components.prompt_panel import DEFAULT_PROMPT
from components.tokens import display_token
from tests.conftest import ATOL
from tests.figures import as_figure

PROMPT = "The cat sat on the mat. The cat sat on the mat."
ANALYSE_OUTPUTS = (
    "data",
    "layer_options",
    "layer",
    "head_options",
    "head",
    "strip",
    "token",
    "alert",
    "alert_open",
    "prompt",
    "model",
    "truncate",
)


def analyse(
    page,
    prompt=PROMPT,
    *,
    clicks=1,
    model=analysis.DEMO_MODEL,
    truncate=False,
    layer="0",
    head="0",
    request=None,
    last=None,
) -> dict:
    values = page.analyse(clicks, prompt, model, truncate, layer, head, request, last)
    return dict(zip(ANALYSE_OUTPUTS, values, strict=True))


def test_analyse_returns_the_view_state_and_one_chip_per_token(attention_page):
    out = analyse(attention_page)

    pa = analysis.analyze(PROMPT, analysis.DEMO_MODEL)
    assert out["data"] == {
        "model": analysis.DEMO_MODEL,
        "prompt": PROMPT,
        "truncate": False,
        "n_layers": pa.n_layers,
        "n_heads": pa.n_heads,
        "n_pos": pa.n_pos,
    }
    assert [o["value"] for o in out["layer_options"]] == [str(i) for i in range(pa.n_layers)]
    assert [o["value"] for o in out["head_options"]] == [str(i) for i in range(pa.n_heads)]
    chips = out["strip"].children
    assert [chip.children for chip in chips] == [display_token(t) for t in pa.str_tokens]
    assert any("·" in chip.children for chip in chips)  # spaces are visible
    assert out["alert_open"] is False
    remembered = attention_page.remember_analysis(out["data"])
    assert remembered == {"model": analysis.DEMO_MODEL, "prompt": PROMPT, "truncate": False}
    # Only names and sizes go to the browser, never arrays.
    assert len(json.dumps(out["data"])) < 200 + len(PROMPT)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "empty"), ("   \n", "empty"), ("bad \x07 bell", "control character")],
)
def test_analyse_shows_refused_prompts_in_the_alert_and_keeps_the_view(
    attention_page, prompt, message
):
    out = analyse(attention_page, prompt)

    assert out["alert_open"] is True
    assert message in out["alert"]
    assert out["data"] is no_update
    assert out["strip"] is no_update


def test_analyse_refuses_a_prompt_over_the_character_limit(attention_page, monkeypatch):
    monkeypatch.setenv("MEMLENS_MAX_PROMPT_CHARS", "10")

    out = analyse(attention_page, "x" * 11)

    assert out["alert_open"] is True
    assert "MEMLENS_MAX_PROMPT_CHARS" in out["alert"]


def test_a_prompt_too_long_for_the_model_is_refused_or_cut_to_its_last_tokens(
    attention_page, monkeypatch
):
    monkeypatch.setenv("MEMLENS_MAX_TOKENS", "8")

    refused = analyse(attention_page)
    cut = analyse(attention_page, truncate=True)

    assert refused["alert_open"] is True
    assert "takes at most 8" in refused["alert"]
    assert cut["data"]["n_pos"] == 8 and cut["data"]["truncate"] is True
    note, strip = cut["strip"].children
    assert "were left out" in note.children
    assert len(strip.children) == 8
    search = attention_page.view_search(cut["data"], "0", "0", None)
    query = {key: values[0] for key, values in parse_qs(search[1:]).items()}
    state, _ = attention_page.parse_view_query(query, default_model=analysis.DEMO_MODEL)
    assert state.truncate is True
    figure, _ = attention_page.show_head(cut["data"], "0", "0", False)
    figure = as_figure(figure)
    assert len(figure.data[0].x) == 8


def test_analyse_refuses_an_unknown_model_when_clicked(attention_page):
    out = analyse(attention_page, model="no-such-model")

    assert out["alert_open"] is True
    assert "unknown model 'no-such-model'" in out["alert"]
    assert out["data"] is no_update


def test_first_load_from_a_link_clamps_out_of_range_indices_with_a_message(attention_page):
    request = {"from_url": True, "token": 999, "messages": []}

    out = analyse(attention_page, clicks=0, layer="7", head="9", request=request)

    assert (out["layer"], out["head"], out["token"]) == ("0", "0", None)
    assert out["alert_open"] is True
    assert "layer 7 does not exist" in out["alert"]
    assert "head 9 does not exist" in out["alert"]
    assert "token 999 does not exist" in out["alert"]
    assert out["data"]["prompt"] == PROMPT


def test_first_load_from_a_link_with_an_unknown_model_falls_back_to_the_default(attention_page):
    request = {"from_url": True, "token": 2, "messages": []}

    out = analyse(attention_page, clicks=0, model="no-such-model", request=request)

    assert out["data"]["model"] == analysis.DEMO_MODEL
    assert out["model"] == analysis.DEMO_MODEL
    assert out["token"] == 2
    assert "Showing memlens-demo instead" in out["alert"]


def test_first_load_without_a_link_reopens_this_tabs_last_analysis(attention_page):
    last = {"model": analysis.DEMO_MODEL, "prompt": "Hello there"}
    request = {"from_url": False, "token": None, "messages": []}

    out = analyse(attention_page, DEFAULT_PROMPT, clicks=0, request=request, last=last)

    assert out["data"]["prompt"] == "Hello there"
    assert out["prompt"] == "Hello there"


def test_head_view_shows_the_cached_pattern_of_the_chosen_head(attention_page):
    data = analyse(attention_page)["data"]
    pa = analysis.analyze(PROMPT, analysis.DEMO_MODEL)

    figure, caption = attention_page.show_head(data, "1", "2", False)
    figure = as_figure(figure)

    expected = pa.attention(1)[2]
    z = np.asarray(figure.data[0].z, dtype=np.float32)
    causal = np.tril(np.ones_like(expected, dtype=bool))
    np.testing.assert_allclose(z[causal], expected[causal], atol=ATOL)
    assert np.isnan(z[~causal]).all()
    assert "query %{y}" in figure.data[0].hovertemplate
    assert "key %{x}" in figure.data[0].hovertemplate
    assert figure.data[0].y[1] == f"1 {display_token(pa.str_tokens[1])}"
    assert caption.startswith("L1 H2: entropy (nats) ")
    assert f"{head_stats(expected)[0]:.2f}" in caption


def test_switching_layer_head_or_token_never_runs_the_model(attention_page, monkeypatch):
    data = analyse(attention_page)["data"]

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a view callback ran the model")

    monkeypatch.setattr("analysis.prompt._compute", no_forward_pass)
    first, _ = attention_page.show_head(data, "0", "0", False)
    first = as_figure(first)
    last_layer, last_head = str(data["n_layers"] - 1), str(data["n_heads"] - 1)
    second, _ = attention_page.show_head(data, last_layer, last_head, True)
    second = as_figure(second)
    attention_page.show_layer(data, last_layer, True, last_head)
    attention_page.show_overview(data, False, last_layer, last_head)
    attention_page.show_summary(data, False, last_layer, last_head)
    attention_page.show_token_flow(data, 4, False, last_layer, last_head)

    assert not np.array_equal(np.nan_to_num(first.data[0].z), np.nan_to_num(second.data[0].z)), (
        "a different head should show a different pattern"
    )


def test_views_without_an_analysis_say_what_to_do(attention_page):
    figure, caption = attention_page.show_head(None, "0", "0", False)
    figure = as_figure(figure)

    assert "Analyse a prompt" in figure.layout.annotations[0].text
    assert caption == ""


def test_head_view_ignores_indices_the_model_does_not_have(attention_page):
    data = analyse(attention_page)["data"]

    assert attention_page.show_head(data, "99", "0", False) == (no_update, no_update)
    assert attention_page.show_head(data, "0", "x", False) == (no_update, no_update)


def test_layer_grid_has_one_trace_per_head_and_frames_the_chosen_one(attention_page):
    data = analyse(attention_page)["data"]

    figure = attention_page.show_layer(data, "1", False, "3")
    figure = as_figure(figure)

    assert len(figure.data) == data["n_heads"]
    assert [shape.xref for shape in figure.layout.shapes] == ["x4 domain"]


def test_grid_overview_and_summary_clicks_choose_layer_and_head(attention_page):
    page = attention_page
    data = analyse(page)["data"]
    overview = page.show_overview(data, False, "0", "0")
    overview = as_figure(overview)
    tile = len(overview.data[0].x) // data["n_heads"]
    last = data["n_layers"] - 1
    # A click inside the tile of the last layer, head 1.
    x, y = overview.data[0].x[tile + 1], overview.data[0].y[last * tile + 1]
    overview_click = {"points": [{"x": x, "y": y}]}

    assert page.selection_from_click(page.GRID, {"points": [{"curveNumber": 3}]}, "1") == (1, 3)
    assert page.selection_from_click(page.OVERVIEW, overview_click, "0") == (last, 1)
    assert page.selection_from_click(page.SUMMARY, {"points": [{"x": 2, "y": 1}]}, "0") == (1, 2)
    assert page.selection_from_click(page.FLOW, {"points": [{"x": 0, "y": 2}]}, "0") == (2, 0)
    assert page.selection_from_click(page.GRID, {"points": []}, "0") is None
    assert page.selection_from_click(page.OVERVIEW, {"points": [{"x": "?", "y": "?"}]}, "0") is None


def test_overview_holds_every_head_of_every_layer(attention_page):
    data = analyse(attention_page)["data"]
    pa = analysis.analyze(PROMPT, analysis.DEMO_MODEL)

    figure = attention_page.show_overview(data, False, "0", "0")
    figure = as_figure(figure)

    z = np.asarray(figure.data[0].z, dtype=np.float32)
    n_pos = pa.n_pos  # short prompt: one cell per token, no downsampling
    assert z.shape == (pa.n_layers * n_pos, pa.n_heads * n_pos)
    last = pa.n_layers - 1
    tile = z[last * n_pos : (last + 1) * n_pos, 1 * n_pos : 2 * n_pos]
    expected = pa.attention(last)[1]
    causal = np.tril(np.ones_like(expected, dtype=bool))
    np.testing.assert_allclose(tile[causal], expected[causal], atol=ATOL)


def test_token_flow_shows_what_the_token_receives_and_sends_in_every_head(attention_page):
    data = analyse(attention_page)["data"]
    pa = analysis.analyze(PROMPT, analysis.DEMO_MODEL)
    token = 3

    figure, caption = attention_page.show_token_flow(data, token, False, "0", "0")
    figure = as_figure(figure)

    received, sent = token_flow(np.stack([pa.attention(layer) for layer in range(pa.n_layers)]))
    np.testing.assert_allclose(figure.data[0].z, received[:, :, token], atol=ATOL)
    np.testing.assert_allclose(figure.data[1].z, sent[:, :, token], atol=ATOL)
    assert caption.startswith(f"Token 3 “{display_token(pa.str_tokens[token])}”")


def test_token_flow_without_a_token_asks_for_a_click(attention_page):
    data = analyse(attention_page)["data"]

    figure, caption = attention_page.show_token_flow(data, None, False, "0", "0")
    figure = as_figure(figure)

    assert "Click a token" in figure.layout.annotations[0].text


def test_clicking_a_heatmap_row_selects_its_query_token(attention_page):
    page = attention_page

    assert page.token_from_heatmap_click({"points": [{"y": "12 ·cat", "x": "3 ·a"}]}) == 12
    assert page.token_from_heatmap_click({"points": [{"y": "300–302 ·a·b·c"}]}) == 300
    assert page.token_from_heatmap_click({"points": [{"y": "not a label"}]}) is None
    assert page.token_from_heatmap_click(None) is None


def test_the_recent_views_link_reopens_the_same_view(attention_page):
    page = attention_page
    data = {"model": "memlens-demo", "prompt": "a & b?\n=c #d", "n_layers": 3, "n_heads": 4}

    search = page.view_search(data, "2", "1", 5)

    query = {key: values[0] for key, values in parse_qs(search[1:]).items()}
    state, messages = page.parse_view_query(query, default_model="memlens-demo")
    assert (state.model, state.prompt, state.layer, state.head, state.token) == (
        "memlens-demo",
        "a & b?\n=c #d",
        2,
        1,
        5,
    )
    assert state.from_url and messages == []


def test_url_with_bad_values_falls_back_to_defaults_with_messages(attention_page):
    query = {"layer": "two", "head": "-1", "token": "", "model": ["a", "b"]}

    state, messages = attention_page.parse_view_query(query, default_model="memlens-demo")

    assert (state.layer, state.head, state.token, state.model) == (0, 0, None, "a")
    assert state.prompt == DEFAULT_PROMPT and not state.from_url
    assert len(messages) == 3


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "prompt", "layer", "head", "token", "other"]),
        st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3)),
    )
)
def test_any_query_parses_to_a_valid_view(memlens_app, query):
    from pages import attention

    state, messages = attention.parse_view_query(query, default_model="memlens-demo")

    assert isinstance(state.model, str) and state.model
    assert isinstance(state.prompt, str) and state.prompt
    assert state.layer >= 0 and state.head >= 0
    assert state.token is None or state.token >= 0
    assert all(isinstance(message, str) for message in messages)


def find(layout, component_id):
    """The component with ``component_id`` in a layout tree."""
    return next(c for c in layout._traverse() if getattr(c, "id", None) == component_id)


def test_layout_opens_with_no_arguments_and_with_a_links_parameters(attention_page):
    page = attention_page

    plain_layout = page.layout()
    from_link = page.layout(prompt="Hi <b>there</b>", layer="1", head="zz")

    assert find(plain_layout, page.PANEL.prompt).value == DEFAULT_PROMPT
    assert find(plain_layout, page.ALERT).is_open is False
    assert find(from_link, page.PANEL.prompt).value == "Hi <b>there</b>"  # text, not markup
    assert find(from_link, page.LAYER).value == "1"
    alert = find(from_link, page.ALERT)
    assert alert.is_open is True
    assert "head 'zz' in the link is not a whole number" in alert.children
