"""Retention page callbacks called as plain functions, on the embedded demo model.

The analysis cache is shared by the tests of this module (one analysis of ``PROMPT``; the CPU is
scarce), so tests that need an empty cache use a prompt of their own. The memory-horizon job is
called directly with a fake ``set_progress`` that records what the progress bar would show.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import numpy as np
import pytest
from dash import no_update
from hypothesis import given, settings
from hypothesis import strategies as st

import analysis
from analysis import retention
from analysis.horizon import memory_horizon
from components.prompt_panel import DEFAULT_PROMPT
from components.retention import log_rank, stage_labels
from components.tokens import display_token
from tests.conftest import ATOL, in_callback
from tests.figures import as_figure

MODEL = analysis.DEMO_MODEL
PROMPT = "The cat sat on the mat. The cat sat on the mat."
ANALYSE_OUTPUTS = (
    "data",
    "strip",
    "pos",
    "source_options",
    "source",
    "stage_options",
    "stage",
    "curve_options",
    "curve_tokens",
    "alert",
    "alert_open",
    "prompt",
    "model",
    "last",
)


@pytest.fixture(scope="module")
def page(memlens_app, tmp_path_factory):
    """The Retention page module, with an analysis cache shared by this module's tests."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMLENS_CACHE_DIR", str(tmp_path_factory.mktemp("retention-cache")))
    from pages import retention as page

    yield page
    patch.undo()


def analyse(page, prompt=PROMPT, *, clicks=1, model=MODEL, request=None, last=None) -> dict:
    values = page.analyse(clicks, prompt, model, request, last)
    return dict(zip(ANALYSE_OUTPUTS, values, strict=True))


@pytest.fixture(scope="module")
def data(page):
    """The analysis store entry of ``PROMPT``."""
    return analyse(page)["data"]


@pytest.fixture(scope="module")
def pa(data):
    return analysis.analyze(PROMPT, MODEL)


def z_of(figure, trace: int = 0) -> np.ndarray:
    return np.asarray(as_figure(figure).data[trace].z, dtype=np.float64)


def triggered(component_id, value=1):
    """Make ``dash.ctx`` report that ``component_id`` fired, as inside a real request."""
    prop = component_id if isinstance(component_id, str) else _json_id(component_id)
    in_callback(triggered_inputs=[{"prop_id": f"{prop}.n_clicks", "value": value}])


def _json_id(component_id: dict) -> str:
    import json

    return json.dumps(component_id, sort_keys=True, separators=(",", ":"))


# --- Analysis and URL ------------------------------------------------------------------------


def test_analyse_chooses_the_last_token_and_follows_three_tokens(page, data, pa):
    out = analyse(page)

    assert out["data"] == {
        "model": MODEL,
        "prompt": PROMPT,
        "n_layers": pa.n_layers,
        "n_heads": pa.n_heads,
        "n_pos": pa.n_pos,
    }
    assert out["pos"] == pa.n_pos - 1
    assert (out["source"], out["stage"]) == ("1", str(pa.n_layers))
    assert out["curve_tokens"] == [1, pa.n_pos // 2, pa.n_pos - 1]
    assert [o["value"] for o in out["stage_options"]] == [str(s) for s in range(1, pa.n_layers + 1)]
    chips = out["strip"].children
    assert [chip.children for chip in chips] == [display_token(t) for t in pa.str_tokens]
    assert out["alert_open"] is False
    assert out["last"] == {"model": MODEL, "prompt": PROMPT}


@pytest.mark.parametrize(("prompt", "message"), [("", "empty"), ("bad \x07 bell", "control")])
def test_analyse_shows_refused_prompts_in_the_alert_and_keeps_the_view(page, prompt, message):
    out = analyse(page, prompt)

    assert out["alert_open"] is True
    assert message in out["alert"]
    assert out["data"] is no_update and out["strip"] is no_update


def test_first_load_from_a_link_uses_its_choices_and_reports_impossible_ones(page, pa):
    request = {"from_url": True, "pos": 3, "source": 999, "stage": 1, "tokens": [2, 500]}

    out = analyse(page, clicks=0, request={**request, "messages": []})

    assert (out["pos"], out["source"], out["stage"]) == (3, "1", "1")
    assert out["curve_tokens"] == [2]
    assert out["alert_open"] is True
    assert "source 999 does not exist" in out["alert"]
    assert "some curve tokens do not exist" in out["alert"]


def test_url_reopens_the_same_view(page, data):
    search = page.view_search(data, 4, "2", "1", [1, 5], "next_rank", "token:17")

    query = {key: values[0] for key, values in parse_qs(search[1:]).items()}
    state, messages = page.parse_view_query(query, default_model=MODEL)
    assert (state.model, state.prompt, state.pos, state.source, state.stage) == (
        MODEL,
        PROMPT,
        4,
        2,
        1,
    )
    assert (state.tokens, state.metric, state.target) == ([1, 5], "next_rank", "token:17")
    assert state.from_url and messages == []


def test_url_with_bad_values_falls_back_to_defaults_with_messages(page):
    query = {"pos": "x", "metric": "<b>", "tokens": "1,a,2", "target": "z", "model": ["a", "b"]}

    state, messages = page.parse_view_query(query, default_model=MODEL)

    assert (state.pos, state.metric, state.tokens, state.target) == (
        None,
        page.DEFAULT_METRIC,
        [1, 2],
        page.TARGET_PREDICTED,
    )
    assert state.model == "a" and state.prompt == DEFAULT_PROMPT and not state.from_url
    assert len(messages) == 5


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "prompt", "pos", "source", "stage", "tokens", "metric", "x"]),
        st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3)),
    )
)
def test_any_query_parses_to_a_valid_view(page, query):
    state, messages = page.parse_view_query(query, default_model=MODEL)

    assert state.metric in page.METRICS
    assert all(isinstance(t, int) and t >= 0 for t in state.tokens)
    assert all(v is None or v >= 0 for v in (state.pos, state.source, state.stage))
    assert all(isinstance(message, str) for message in messages)


def find(layout, component_id):
    return next(c for c in layout._traverse() if getattr(c, "id", None) == component_id)


def test_layout_opens_with_no_arguments_and_keeps_link_text_as_text(page):
    plain = page.layout()
    linked = page.layout(prompt="Hi <b>there</b>", metric="norm", pos="-2")

    assert find(plain, page.PANEL.prompt).value == DEFAULT_PROMPT
    assert find(plain, page.ALERT).is_open is False
    assert find(linked, page.PANEL.prompt).value == "Hi <b>there</b>"
    assert find(linked, page.METRIC).value == "norm"
    assert "pos '-2' in the link is not a whole number" in find(linked, page.ALERT).children


# --- Token choice ----------------------------------------------------------------------------


def test_clicking_a_chip_chooses_the_token_and_adds_it_to_the_curves(page, data):
    triggered({"index": 4, "type": page.TOKEN_CHIP})

    assert page.choose_position([0] * 4 + [1], None, None, [1, 2], data) == (4, [1, 2, 4])
    assert page.choose_position([0] * 4 + [1], None, None, [1, 4], data) == (4, [1, 4])


def test_a_freshly_drawn_strip_chooses_nothing(page, data):
    triggered({"index": 0, "type": page.TOKEN_CHIP}, value=0)

    assert page.choose_position([0, 0], None, None, [1], data) == (no_update, no_update)


def test_clicking_a_heatmap_column_or_reach_bar_chooses_that_token(page, data):
    click = {"points": [{"x": "6 ·on", "y": "embed"}]}

    triggered(page.RESID)
    assert page.choose_position([], click, None, [1], data) == (6, no_update)
    triggered(page.REACH)
    assert page.choose_position([], None, {"points": [{"x": "0 <|endoftext|>"}]}, [], data) == (
        0,
        no_update,
    )
    assert page.choose_source(click, data) == "6"
    assert page.choose_source({"points": [{"x": "999 ·x"}]}, data) is no_update
    assert page.position_from_click({"points": [{"x": "no number"}]}) is None


# --- Views -----------------------------------------------------------------------------------


def test_composition_rows_are_the_rollout_of_the_chosen_token(page, data, pa):
    pos = 7

    figure, caption, *alert = page.show_composition(data, pos, "2", False)
    figure = as_figure(figure)

    z = z_of(figure)
    assert z.shape == (pa.n_layers + 1, pos + 1)  # only sources up to the token
    np.testing.assert_allclose(z, retention.rollout_shares(pa, pos)[:, : pos + 1], atol=ATOL)
    np.testing.assert_allclose(z.sum(1), 1.0, atol=ATOL)
    assert list(figure.data[0].y) == stage_labels(pa.n_layers)
    assert figure.data[0].x[2] == f"2 {display_token(pa.str_tokens[2])}"
    assert figure.layout.xaxis.title.text == "source token"
    assert [shape.x0 + 0.5 for shape in figure.layout.shapes] == [2]  # the source is framed
    assert f"token {pos}" in figure.layout.title.text and caption
    assert alert == [no_update, no_update]


def test_reach_bars_are_the_source_share_in_every_later_stream(page, data, pa):
    figure, caption, *_ = page.show_reach(data, "2", "1", False)
    figure = as_figure(figure)

    y = np.asarray(figure.data[0].y, dtype=np.float64)
    reach = retention.memory_reach(pa, 2, layer=1)
    np.testing.assert_allclose(y, reach[2:], atol=ATOL)  # from the source on
    assert np.all(reach[:2] == 0) and y[0] > 0
    assert figure.data[0].x[0] == f"2 {display_token(pa.str_tokens[2])}"
    assert "after L0" in figure.layout.title.text
    assert caption.startswith("The share of token 2")


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("cosine", lambda pa, lens: retention.embedding_cosine(pa)),
        ("norm", lambda pa, lens: retention.resid_norms(pa)),
        ("token_prob", lambda pa, lens: lens.token_prob),
        ("next_prob", lambda pa, lens: lens.next_prob),
        ("kl", lambda pa, lens: lens.kl_to_final),
        ("token_rank", lambda pa, lens: log_rank(lens.token_rank)),
        ("next_rank", lambda pa, lens: log_rank(lens.next_rank)),
    ],
)
def test_residual_stream_heatmap_shows_the_chosen_metric(page, data, pa, metric, expected):
    figure, caption, *_ = page.show_resid(data, metric, 3, False)
    figure = as_figure(figure)

    lens = retention.logit_lens(pa)
    np.testing.assert_allclose(z_of(figure), expected(pa, lens), atol=ATOL)
    n_cols = pa.n_pos - 1 if metric.startswith("next") else pa.n_pos
    assert len(figure.data[0].x) == n_cols
    assert figure.layout.title.text and figure.layout.xaxis.title.text == "position"
    assert caption.startswith(page.METRICS[metric][1])


def test_rank_hover_shows_the_zero_based_rank_itself(page, data, pa):
    figure, *_ = page.show_resid(data, "next_rank", 3, False)
    figure = as_figure(figure)

    hover = np.asarray(figure.data[0].customdata, dtype=object)[..., 0].astype(np.float64)
    np.testing.assert_array_equal(hover, retention.logit_lens(pa).next_rank)
    assert "next “" in figure.data[0].customdata[0][3][2]  # the column's next token


def test_switching_metric_changes_the_figure(page, data):
    cosine, *_ = page.show_resid(data, "cosine", 3, False)
    norm, *_ = page.show_resid(data, "norm", 3, False)

    assert not np.allclose(z_of(cosine), z_of(norm))


def test_logit_lens_table_lists_the_top_guesses_and_kl_ends_at_zero(page, data, pa):
    pos = 4

    table, kl, caption, *_ = page.show_lens(data, pos, False)
    kl = as_figure(kl)
    table = as_figure(table)

    lens = retention.logit_lens(pa)
    np.testing.assert_allclose(z_of(table), lens.top_probs[:, pos], atol=ATOL)
    guesses = retention.logit_lens_top_k_str(pa, lens)
    assert table.data[0].text[-1][0].startswith(display_token(guesses[-1][pos][0]))
    kl_at_pos = np.asarray(kl.data[0].y, dtype=np.float64)
    np.testing.assert_allclose(kl_at_pos, lens.kl_to_final[:, pos], atol=ATOL)
    assert kl_at_pos[-1] == pytest.approx(0.0, abs=ATOL)
    assert caption


def test_retention_curves_draw_one_line_per_token_in_each_panel(page, data, pa):
    positions = [1, 5, 9]

    figure, *_ = page.show_curves(data, positions, False)
    figure = as_figure(figure)

    assert len(figure.data) == 3 * len(positions)
    curves = retention.retention_curves(pa, positions)
    cosine = np.asarray([figure.data[i].y for i in range(3)], dtype=np.float64)
    share = np.asarray([figure.data[6 + i].y for i in range(3)], dtype=np.float64)
    np.testing.assert_allclose(cosine, curves["embedding_cosine"], atol=ATOL)
    np.testing.assert_allclose(share, curves["rollout_share"], atol=ATOL)
    assert share[:, 0] == pytest.approx([1, 1, 1])  # every token is all itself before layer 0
    assert [trace.showlegend for trace in figure.data[:4]] == [True, True, True, False]


def test_curves_without_tokens_ask_for_some(page, data):
    figure, *_ = page.show_curves(data, [], False)
    figure = as_figure(figure)

    assert "Choose tokens" in figure.layout.annotations[0].text


def test_attribution_parts_add_up_to_the_logit_of_the_chosen_target(page, data, pa):
    pos = 5
    options, value = page.update_targets(data, pos, "actual")

    figure, caption, *_ = page.show_attribution(data, pos, value, False)
    figure = as_figure(figure)

    assert value == "actual" and [o["value"] for o in options][:2] == ["predicted", "actual"]
    expected = retention.direct_logit_attribution(pa, pos, int(pa.tokens[pos + 1]))
    np.testing.assert_allclose(z_of(figure), expected.heads, atol=ATOL)
    bars = dict(zip(figure.data[1].x, figure.data[1].y, strict=True))
    assert sum(bars.values()) + expected.unembed_bias == pytest.approx(expected.logit, abs=ATOL)
    assert f"{expected.logit:.2f}" in caption
    assert display_token(pa.str_tokens[pos + 1]) in figure.layout.title.text


def test_the_last_token_has_no_actual_next_target(page, data, pa):
    options, value = page.update_targets(data, pa.n_pos - 1, "actual")

    assert "actual" not in [o["value"] for o in options]
    assert value == "predicted"


def test_switching_token_metric_or_target_never_runs_the_model(page, data, monkeypatch):
    views = [
        lambda pos, metric: page.show_composition(data, pos, "1", False),
        lambda pos, metric: page.show_reach(data, str(pos), "1", False),
        lambda pos, metric: page.show_resid(data, metric, pos, False),
        lambda pos, metric: page.show_lens(data, pos, True),
        lambda pos, metric: page.show_curves(data, [pos, 1], False),
        lambda pos, metric: page.show_attribution(data, pos, "predicted", False),
        lambda pos, metric: page.update_targets(data, pos, "actual"),
    ]
    first = [view(2, "cosine") for view in views]  # fills the cached arrays once

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a view ran the model")

    bridge = analysis.load_model(MODEL).bridge
    monkeypatch.setattr(bridge, "run_with_cache", no_forward_pass)
    monkeypatch.setattr(bridge, "forward", no_forward_pass)
    monkeypatch.setattr("analysis.prompt._compute", no_forward_pass)
    second = [view(6, "next_rank") for view in views]

    for before, after in zip(first[:6], second[:6], strict=True):
        assert after[-2:] == (no_update, no_update), after[-1]  # no alert
        assert not np.array_equal(z_or_y(before[0]), z_or_y(after[0]))


def z_or_y(figure) -> np.ndarray:
    trace = as_figure(figure).data[0]
    values = trace.z if trace.type == "heatmap" else trace.y
    return np.nan_to_num(np.asarray(values, dtype=np.float64))


def test_views_without_an_analysis_say_what_to_do(page):
    figure, caption, *alert = page.show_composition(None, None, None, False)
    figure = as_figure(figure)

    assert "Analyse a prompt" in figure.layout.annotations[0].text
    assert caption == "" and alert == [no_update, no_update]


def test_a_view_of_replaced_weights_says_so_in_the_alert(page, data):
    stale = {**data, "n_layers": data["n_layers"] + 1}

    figure, caption, message, is_open = page.show_reach(stale, "1", str(data["n_layers"] + 1), 0)

    assert is_open is True and "changed since this prompt was analysed" in message
    assert caption == ""


def test_token_text_reaches_figures_escaped(page):
    data = analyse(page, "a <b>bold</b> & move")["data"]

    figure, *_ = page.show_resid(data, "cosine", 1, False)
    figure = as_figure(figure)

    labels = " ".join(figure.data[0].x)  # BOS is "<|endoftext|>"
    assert "<" not in labels and "&lt;" in labels and "&amp;" in labels


# --- Memory horizon --------------------------------------------------------------------------


def test_horizon_job_reports_progress_and_its_result_is_then_shown(page):
    prompt = "red green blue red green blue"
    data = analyse(page, prompt)["data"]
    hint, *_ = page.show_horizon(data, None, False)
    hint = as_figure(hint)
    progress = []

    done, message, is_open = page.run_horizon(progress.append, 1, data)

    assert "Press Run" in hint.layout.annotations[0].text  # nothing ran before the job
    assert done == {"key": analysis.analyze(prompt, MODEL).key}
    assert (message, is_open) == ("", False)
    assert progress[0][0] == 0 and progress[-1] == (1, 1, "done")
    steps = [value for value, _, _ in progress[:-1]]
    assert steps == sorted(steps) and progress[-2][0] == progress[-2][1]

    heatmap, curve, caption, *alert = page.show_horizon(data, done, False)
    curve = as_figure(curve)
    result = memory_horizon(analysis.analyze(prompt, MODEL))
    z = z_of(heatmap)
    shown = result.k_values[:, None] <= result.context[None]
    np.testing.assert_allclose(z[shown], result.loss[shown], atol=ATOL)
    assert np.isnan(z[~shown]).all()
    np.testing.assert_allclose(curve.data[0].y, result.mean_loss, atol=ATOL)
    assert "median" in caption and alert == [no_update, no_update]


def test_horizon_job_without_an_analysis_says_what_to_do(page):
    progress = []

    done, message, is_open = page.run_horizon(progress.append, 1, None)

    assert done is no_update and is_open is True and "Analyse a prompt first" in message
    assert progress == []
