"""Heads page callbacks called as plain functions, on the embedded demo model.

The battery's head scores are computed once for this module (one cache shared by its tests).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from dash import no_update

import analysis
from analysis.heads import HEAD_SCORE_NAMES, model_head_scores, prompt_head_scores
from components.prompt_panel import DEFAULT_PROMPT
from tests.conftest import in_callback
from tests.figures import as_figure

MODEL = analysis.DEMO_MODEL
PROMPT = "one two three four one two three four"
# What the trained demo weights promise (tests/analysis/test_demo_model.py holds them to it).
MIN_TRAINED_HEAD_SCORE = 0.8


@pytest.fixture(scope="module")
def page(memlens_app, tmp_path_factory):
    """The Heads page module, with a cache shared by this module's tests."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMLENS_CACHE_DIR", str(tmp_path_factory.mktemp("heads-cache")))
    from pages import heads as page

    yield page
    patch.undo()


@pytest.fixture(scope="module")
def battery(page):
    return model_head_scores(MODEL)


def show(page, score="induction", source="battery", *, model=MODEL, last=None, dark=False):
    figure, caption, summary, rows, alert, is_open = page.show_scores(
        model, score, source, dark, last
    )
    return {
        "figure": figure,
        "caption": caption,
        "summary": summary,
        "rows": rows,
        "alert": alert,
        "alert_open": is_open,
    }


def summary_text(summary) -> str:
    return " ".join(
        "".join(part if isinstance(part, str) else part.children for part in _parts(line))
        for line in summary
    )


def _parts(line):
    return line.children if isinstance(line.children, list) else [line.children]


def test_every_head_score_has_a_title_and_caption(page):
    assert set(page.SCORES) == set(HEAD_SCORE_NAMES)


def test_heatmap_shows_the_chosen_score_and_frames_its_strongest_head(page, battery):
    out = show(page, "previous_token")

    z = np.asarray(as_figure(out["figure"]).data[0].z, dtype=np.float64)
    np.testing.assert_allclose(z, battery.previous_token, atol=1e-6)
    layer, head, _ = battery.best("previous_token")
    (frame,) = as_figure(out["figure"]).layout.shapes
    assert (frame.x0 + 0.5, frame.y0 + 0.5) == (head, layer)
    assert as_figure(out["figure"]).layout.xaxis.title.text == "head"
    assert as_figure(out["figure"]).layout.yaxis.title.text == "layer"
    assert "Previous token score" in as_figure(out["figure"]).layout.title.text
    assert out["caption"].startswith(page.SCORES["previous_token"][1])
    assert out["alert_open"] is False


def test_table_lists_every_head_with_every_score(page, battery):
    rows = show(page)["rows"]

    n_layers, n_heads = battery.induction.shape
    assert [row["id"] for row in rows] == [
        f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)
    ]
    last = rows[-1]
    for name in HEAD_SCORE_NAMES:
        assert last[name] == pytest.approx(float(getattr(battery, name)[-1, -1]), abs=1e-4)
    table = find(page.layout(), page.TABLE)
    assert table.sort_action == "native"
    assert [c["id"] for c in table.columns] == ["head", *page.SCORES]


def test_summary_names_the_strongest_heads_and_the_loss_ratio(page, battery):
    text = summary_text(show(page)["summary"])

    for name, kind in (("previous_token", "previous-token"), ("induction", "induction")):
        layer, head, value = battery.best(name)
        assert f"Strongest {kind} head: L{layer} H{head} ({value:.2f}" in text
    assert f"{battery.loss_ratio:.2f} × the loss on the first half" in text


def test_switching_score_never_reruns_the_battery(page, battery, monkeypatch):
    first = show(page, "induction")["figure"]
    first = as_figure(first)

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("the Heads page ran the model")

    bridge = analysis.load_model(MODEL).bridge
    monkeypatch.setattr(bridge, "run_with_cache", no_forward_pass)
    monkeypatch.setattr(bridge, "forward", no_forward_pass)
    second = show(page, "mean_distance", dark=True)["figure"]
    second = as_figure(second)

    assert not np.allclose(first.data[0].z, second.data[0].z)


def test_scores_of_the_last_prompt_come_from_its_analysis(page):
    last = {"model": MODEL, "prompt": PROMPT}

    out = show(page, "induction", "prompt", last=last)

    expected = prompt_head_scores(analysis.analyze(PROMPT, MODEL))
    np.testing.assert_allclose(as_figure(out["figure"]).data[0].z, expected.induction, atol=1e-6)
    assert "your last prompt" in as_figure(out["figure"]).layout.title.text
    assert "× the loss" not in summary_text(out["summary"])  # no battery, no loss ratio


def test_prompt_scores_without_an_analysis_say_what_to_do(page):
    out = show(page, "induction", "prompt", last=None)

    assert out["alert_open"] is True
    assert "no prompt analysed in this tab yet" in out["alert"]
    assert out["rows"] == []


def test_an_unknown_model_is_reported_in_the_alert(page):
    out = show(page, model="no-such-model")

    assert out["alert_open"] is True
    assert "no-such-model" in out["alert"]


def test_bad_score_and_source_values_fall_back_to_the_defaults(page, battery):
    out = show(page, "<script>", "nowhere")

    np.testing.assert_allclose(as_figure(out["figure"]).data[0].z, battery.induction, atol=1e-6)


def triggered(component_id: str, prop: str):
    in_callback(f"{component_id}.{prop}")


def test_clicking_a_cell_or_a_row_opens_that_head_on_the_attention_page(page):
    from pages import attention

    triggered(page.HEATMAP, "clickData")
    from_cell = page.open_head({"points": [{"x": 3, "y": 1}]}, None, MODEL, "battery", None)
    triggered(page.TABLE, "active_cell")
    row = {"row": 0, "column": 2, "row_id": "L0H2", "column_id": "induction"}
    last = {"model": MODEL, "prompt": PROMPT}
    from_row = page.open_head(None, row, MODEL, "prompt", last)

    for href, layer, head, prompt in ((from_cell, 1, 3, DEFAULT_PROMPT), (from_row, 0, 2, PROMPT)):
        url = urlsplit(href)
        assert url.path == "/"
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        state, messages = attention.parse_view_query(query, default_model=MODEL)
        assert (state.model, state.layer, state.head, state.prompt) == (MODEL, layer, head, prompt)
        assert state.from_url and messages == []


def test_clicks_that_name_no_head_open_nothing(page):
    triggered(page.HEATMAP, "clickData")
    assert page.open_head({"points": []}, None, MODEL, "battery", None) is no_update
    triggered(page.TABLE, "active_cell")
    assert page.open_head(None, {"row": 0}, MODEL, "battery", None) is no_update


def test_url_keeps_model_score_and_source(page):
    search = page.sync_url(MODEL, "entropy", "prompt")

    query = {key: values[0] for key, values in parse_qs(search[1:]).items()}
    state, messages = page.parse_view_query(query, default_model="other")
    assert (state.model, state.score, state.source) == (MODEL, "entropy", "prompt")
    assert messages == []


def test_url_with_bad_values_falls_back_with_messages(page):
    query = {"score": "<b>x</b>", "source": "web", "model": ["a", "b"]}

    state, messages = page.parse_view_query(query, default_model=MODEL)

    assert (state.model, state.score, state.source) == ("a", "induction", "battery")
    assert len(messages) == 3


def find(layout, component_id):
    return next(c for c in layout._traverse() if getattr(c, "id", None) == component_id)


def test_layout_opens_with_no_arguments_and_with_a_link(page):
    plain = page.layout()
    linked = page.layout(score="entropy", source="bad")

    assert find(plain, page.SCORE).value == "induction"
    assert find(plain, page.ALERT).is_open is False
    assert find(linked, page.SCORE).value == "entropy"
    assert find(linked, page.SOURCE).value == "battery"
    assert find(linked, page.ALERT).is_open is True


def test_trained_demo_models_induction_and_previous_token_heads_stand_out(page, battery):
    # Holds for the trained memlens-demo weights, not for an untrained placeholder: its
    # strongest induction and previous-token heads are framed, named, and far above the rest.
    for name in ("induction", "previous_token"):
        out = show(page, name)
        layer, head, value = battery.best(name)
        z = np.asarray(as_figure(out["figure"]).data[0].z, dtype=np.float64)
        others = np.delete(z.ravel(), layer * z.shape[1] + head)

        assert value >= MIN_TRAINED_HEAD_SCORE, f"best {name} head scores {value:.3f}"
        assert value >= 2 * np.nanmedian(others)
        assert f"({value:.2f}, strong)" in summary_text(out["summary"])
