"""Ablate page callbacks called as plain functions, on the embedded demo model.

The sweep job (a background callback) is called directly with a fake ``set_progress`` that
records what the progress bar would show.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

import numpy as np
import pytest
from dash import no_update

import analysis
from analysis.ablation import Component, ablate, ablation_sweep
from components.ablation import CHOSEN_CLASS, FAILURE_CLASS
from tests.conftest import ATOL, in_callback
from tests.figures import as_figure

MODEL = analysis.DEMO_MODEL
PROMPT = "The cat sat on the mat. The cat sat on the mat."
OUTPUTS = (
    "data",
    "options",
    "strip",
    "failures",
    "chosen",
    "summary",
    "loss",
    "delta",
    "table",
    "alert",
    "alert_open",
    "search",
    "last",
    "ablation",
)


@pytest.fixture
def page(memlens_app, cache_dir):
    """The Ablate page module, with a fresh analysis cache for this test."""
    from pages import ablate as page

    return page


def run(
    page,
    components=(),
    *,
    method="zero",
    positions="",
    source="",
    prompt=PROMPT,
    chosen=(),
    references="",
):
    values = page.run_ablation(
        0,
        1,
        False,
        prompt,
        MODEL,
        list(components),
        positions,
        method,
        source,
        list(chosen),
        references,
    )
    return dict(zip(OUTPUTS, values, strict=True))


def triggered(prop_id: str) -> None:
    """Make ``ctx.triggered_id`` of the next callback call ``prop_id``'s component."""
    in_callback(prop_id)


def trace(figure, name: str) -> np.ndarray:
    found = [t for t in as_figure(figure).data if t.name == name]
    assert found, f"no trace named {name!r}"
    return np.asarray(found[0].y, dtype=np.float32)


def test_ablating_nothing_changes_nothing(page):
    out = run(page)

    assert out["alert_open"] is False
    np.testing.assert_allclose(trace(out["loss"], "after"), trace(out["loss"], "before"), atol=0)
    np.testing.assert_array_equal(np.asarray(as_figure(out["delta"]).data[0].y), 0)
    assert out["failures"] == []
    assert out["summary"].startswith("Nothing is ablated yet")
    n_pos = out["data"]["n_pos"]
    assert len(out["options"]) == out["data"]["n_layers"] * (out["data"]["n_heads"] + 2)
    assert len(out["strip"].children) == n_pos


def test_zero_ablating_a_head_shows_the_direct_ablation_results(page):
    out = run(page, ["L1H2"])
    direct = ablate(analysis.analyze(PROMPT, MODEL), Component("head", 1, 2), method="zero")

    assert out["alert_open"] is False
    np.testing.assert_allclose(trace(out["loss"], "after"), direct.loss_after, atol=ATOL)
    np.testing.assert_allclose(trace(out["loss"], "before"), direct.loss_before, atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(as_figure(out["delta"]).data[0].y), direct.delta_loss, atol=ATOL
    )
    assert out["failures"] == [int(p) for p in direct.failure_tokens]
    assert "L1H2" in out["summary"]


def test_failed_tokens_are_marked_in_the_strip(page):
    out = run(page, ["L0attn", "L1attn", "L0mlp", "L1mlp"])
    classes = [chip.className for chip in out["strip"].children]

    marked = [i for i, name in enumerate(classes) if FAILURE_CLASS in name.split()]
    assert marked == out["failures"]


def test_components_at_positions_and_every_method_run(page):
    for method, source in (
        ("mean", ""),
        ("resample", "The dog ran to the car. The dog ran to the car."),
    ):
        out = run(page, ["L0H1", "L1mlp"], method=method, positions="3, 5-7", source=source)
        assert out["alert_open"] is False, out["alert"]
        query = parse_qs(out["search"][1:])
        assert query["components"] == ["L0H1,L1mlp"]
        assert query["positions"] == ["3, 5-7"]
        assert query["method"] == [method]


@pytest.mark.parametrize(
    "components, positions, method, source, message",
    [
        (["banana"], "", "zero", "", "is not a component"),
        (["L1X2"], "", "zero", "", "is not a component"),
        (["L9H0"], "", "zero", "", "layer 9 is out of range"),
        (["L0H7"], "", "zero", "", "head 7 is out of range"),
        (["L0H0"], "2-x", "zero", "", "not a number or a range"),
        (["L0H0"], "999", "zero", "", "position 999 is out of range"),
        (["L0H0"], "", "resample", "", "needs a source prompt"),
        (["L0H0"], "", "resample", "Too short.", "tokens"),
        (["L0H0"], "", "reference", "", "needs some: type one prompt per line"),
        (["L0H0"], "", "reference", "ok\n\x07bell", "reference prompt 2: .*control character"),
        (["L0H0"], "", "reference", "a\n" * 65, "at most 64 lines"),
        (["L0H0"], "", "median", "", "choose a method"),
    ],
)
def test_bad_input_gives_an_alert_not_an_exception(
    page, components, positions, method, source, message
):
    references = source if method == "reference" else ""
    out = run(
        page, components, positions=positions, method=method, source=source, references=references
    )

    assert out["alert_open"] is True
    assert re.search(message, out["alert"]), out["alert"]
    assert out["loss"] is no_update and out["search"] is no_update


def test_the_url_reopens_the_same_ablation(page):
    out = run(page, ["L1H2", "L1attn"], method="mean", positions="4")
    query = {key: values[0] for key, values in parse_qs(out["search"][1:]).items()}
    state = page.parse_query(query)

    assert state == {
        "model": MODEL,
        "prompt": PROMPT,
        "components": ["L1H2", "L1attn"],
        "positions": "4",
        "method": "mean",
        "source": "",
        "references": "",
        "messages": [],
    }


def test_a_link_with_an_unknown_method_says_so_on_the_first_run(page):
    state = page.parse_query({"method": "<script>"})
    assert state["method"] == "zero"
    assert state["messages"] == [
        "method '<script>' in the link is not one of zero, mean, reference, resample; using zero"
    ]

    args = (False, PROMPT, MODEL, [], "", state["method"], "", [], "", state["messages"])
    first = dict(zip(OUTPUTS, page.run_ablation(None, None, *args), strict=True))
    assert first["alert_open"] is True
    assert first["alert"] == state["messages"][0]

    # Once the user presses a button, the note has been read: a good run closes the alert.
    later = dict(zip(OUTPUTS, page.run_ablation(1, None, *args), strict=True))
    assert later["alert_open"] is False

    references = "The dog ran.\nA cat sat on a mat."
    out = run(page, ["L0H1"], method="reference", references=references)
    query = {key: values[0] for key, values in parse_qs(out["search"][1:]).items()}
    state = page.parse_query(query)
    assert (state["method"], state["references"]) == ("reference", references)


def test_user_text_reaches_the_page_only_as_text(page):
    prompt = "<b>bold</b> & <img src=x onerror=alert(1)>"
    out = run(page, ["L0H0"], prompt=prompt)

    assert out["alert_open"] is False
    chips = [chip.children for chip in out["strip"].children]
    assert all(isinstance(text, str) for text in chips)
    assert "<b>bold</b>" in "".join(chips).replace("·", " ")
    labels = list(as_figure(out["loss"]).data[0].x)
    assert all("<" not in label for label in labels)
    table = out["table"].children
    assert all(
        isinstance(cell.children, str)
        for row in table.children[1].children
        for cell in row.children
    )


def test_clicking_tokens_toggles_them_and_restyles_the_strip(page):
    def click(position, chosen):
        in_callback(json.dumps({"index": position, "type": page.TOKEN_CHIP}) + ".n_clicks")
        return page.toggle_token([1], chosen)

    chosen = click(5, [])
    chosen = click(3, chosen)
    assert chosen == [3, 5]
    assert click(5, chosen) == [3]
    assert click(0, chosen) is no_update  # the first token has no loss

    ids = [{"type": page.TOKEN_CHIP, "index": i} for i in range(6)]
    classes = page.restyle_tokens([3], [4], ids)
    assert CHOSEN_CLASS in classes[3].split() and FAILURE_CLASS in classes[4].split()
    assert CHOSEN_CLASS not in classes[4].split()


def test_sweep_job_gives_a_layer_by_head_heatmap_with_progress(page):
    out = run(page)
    data = out["data"]
    calls = []

    heads, layers, selected, request, alert, alert_open = page.run_sweep(
        calls.append, 1, data, "zero", "", "", [8, 9], False
    )
    heads = as_figure(heads)
    layers = as_figure(layers)
    selected = as_figure(selected)

    assert alert_open is False
    z = np.asarray(heads.data[0].z)
    assert z.shape == (data["n_layers"], data["n_heads"])
    assert np.isfinite(z).all()
    assert np.asarray(layers.data[0].z).shape == (data["n_layers"], 2)
    total = data["n_layers"] * (data["n_heads"] + 2)
    assert calls[0][:2] == (0, total) and calls[-1][:2] == (total, total)

    # The heatmap is the analysis layer's sweep, and the chosen-token view its selection.
    sweep = ablation_sweep(analysis.analyze(PROMPT, MODEL), method="zero", selected_tokens=[8, 9])
    np.testing.assert_allclose(z, sweep.head_delta, atol=ATOL)
    np.testing.assert_allclose(np.asarray(selected.data[0].z), sweep.head_delta_selected, atol=ATOL)
    shown = page.show_selected([2], False, request)
    shown = as_figure(shown)
    np.testing.assert_allclose(
        np.asarray(shown.data[0].z), sweep.with_selection([2]).head_delta_selected, atol=ATOL
    )


def test_sweep_job_without_an_analysis_or_with_bad_positions_alerts(page):
    result = page.run_sweep(lambda _: None, 1, None, "zero", "", "", [], False)
    assert result[-1] is True and "Analyse a prompt first" in result[-2]

    data = run(page)["data"]
    result = page.run_sweep(lambda _: None, 1, data, "zero", "", "400", [], False)
    assert result[-1] is True and "out of range" in result[-2]


def test_component_words_round_trip(page):
    for word in ("L0H3", "L2attn", "L1mlp"):
        assert page.component_value(page.parse_component(word)) == word
    assert page.parse_component("l1 MLP") == Component("mlp", 1)


def test_mean_over_reference_prompts_is_the_analysis_mean_over_those_prompts(page):
    # Blank lines are skipped and each line is stripped.
    typed = "The dog ran to the car.\n\n  A bird flew over the house.  \n"
    references = ["The dog ran to the car.", "A bird flew over the house."]
    out = run(page, ["L0attn"], method="reference", references=typed)
    direct = ablate(
        analysis.analyze(PROMPT, MODEL),
        Component("attn", 0),
        method="mean",
        reference_prompts=references,
    )
    own_mean = run(page, ["L0attn"], method="mean")

    assert out["alert_open"] is False, out["alert"]
    np.testing.assert_allclose(trace(out["loss"], "after"), direct.loss_after, atol=ATOL)
    assert np.abs(trace(own_mean["loss"], "after") - direct.loss_after).max() > 10 * ATOL
    assert "mean over reference prompts" in out["summary"]
    assert out["ablation"]["reference_prompts"] == references


def test_only_the_chosen_method_shows_its_text_box(page):
    assert page.show_method_inputs("resample") == (False, True)
    assert page.show_method_inputs("reference") == (True, False)
    assert page.show_method_inputs("zero") == (True, True)


def test_downstream_attention_map_and_the_clicked_heads_patterns(page):
    out = run(page, ["L0H1"])
    request, n_layers = out["ablation"], out["data"]["n_layers"]
    result = ablate(analysis.analyze(PROMPT, MODEL), Component("head", 0, 1))
    change = result.attention_change()

    # A new ablation shows the head whose attention moved most.
    triggered(f"{page.ABLATION}.data")
    heatmap, patterns, selected = page.show_downstream_attention(
        request, None, False, None, out["data"]
    )
    heatmap = as_figure(heatmap)
    patterns = as_figure(patterns)
    z = np.asarray(heatmap.data[0].z, dtype=np.float32)
    assert z.shape == (n_layers, out["data"]["n_heads"])
    assert np.isnan(z[0]).all()  # layer 0 is not downstream of its own head
    np.testing.assert_allclose(z[1:], change, atol=ATOL)
    row, head = np.unravel_index(int(np.argmax(change)), change.shape)
    assert selected == [result.attention_layers[row], int(head)]

    # Clicking a head shows that head before, after, and the change.
    click = {"points": [{"x": heatmap.data[0].x[2], "y": heatmap.data[0].y[1]}]}
    triggered(f"{page.ATTN_CHANGE}.clickData")
    _, patterns, selected = page.show_downstream_attention(
        request, click, False, selected, out["data"]
    )
    patterns = as_figure(patterns)
    assert selected == [1, 2]
    index = result.attention_layers.index(1)
    before, after = result.attention_before[index, 2], result.attention_after[index, 2]
    causal = np.tril(np.ones_like(before, dtype=bool))
    for trace_, expected in zip(patterns.data, [before, after, after - before], strict=True):
        np.testing.assert_allclose(np.asarray(trace_.z)[causal], expected[causal], atol=ATOL)

    # Switching dark mode keeps the clicked head.
    triggered("app-color-mode.value")
    _, _, kept = page.show_downstream_attention(request, click, True, selected, out["data"])
    assert kept == [1, 2]


def test_an_ablation_in_the_last_layer_has_no_downstream_attention(page):
    out = run(page, ["L1mlp"])
    triggered(f"{page.ABLATION}.data")
    heatmap, patterns, selected = page.show_downstream_attention(
        out["ablation"], None, False, None, out["data"]
    )
    heatmap = as_figure(heatmap)
    patterns = as_figure(patterns)

    assert selected is None
    assert np.isnan(np.asarray(heatmap.data[0].z, dtype=np.float32)).all()
    assert "last layer" in patterns.layout.annotations[0].text


def test_sweep_with_reference_prompts_uses_them(page):
    data = run(page)["data"]
    references = "The dog ran to the car.\nA bird flew over the house."
    out = page.run_sweep(lambda _: None, 1, data, "reference", "", "", [], False, references)

    assert out[-1] is False, out[-2]
    sweep = ablation_sweep(
        analysis.analyze(PROMPT, MODEL),
        method="mean",
        reference_prompts=references.split("\n"),
    )
    np.testing.assert_allclose(np.asarray(as_figure(out[0]).data[0].z), sweep.head_delta, atol=ATOL)
    assert out[3]["references"] == references.split("\n")


def test_report_bundles_the_ablation_and_the_cached_sweep(page):
    import io
    import zipfile

    from components.export import build_bundle

    out = run(page, ["L0H1"], chosen=[8])
    _, _, _, sweep_request, _, _ = page.run_sweep(
        lambda _: None, 1, out["data"], "zero", "", "", [8], False
    )

    report = page.report_inputs(out["ablation"], sweep_request, [8], [1, 2], out["data"], False)
    content, manifest = build_bundle(report, formats=["csv"])

    names = [item.name for item in report.figures]
    assert names == [
        "loss",
        "delta-loss",
        "attention-change",
        "attention-before-after",
        "sweep-heads",
        "sweep-layers",
        "sweep-chosen-tokens",
    ]
    assert manifest["prompts"] == [PROMPT]
    assert manifest["settings"]["ablation"]["components"] == ["L0H1"]
    assert manifest["settings"]["sweep"]["chosen_tokens"] == [8]
    assert "L1H2" in report.figures[3].title  # the head the user clicked
    # The sweep's CSV is the analysis layer's layer × head Δ mean loss.
    sweep = ablation_sweep(analysis.analyze(PROMPT, MODEL), method="zero")
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        rows = archive.read("data/sweep-heads.csv").decode().splitlines()[1:]
    z = np.array([float(row.rsplit(",", 1)[1]) for row in rows]).reshape(sweep.head_delta.shape)
    np.testing.assert_allclose(z, sweep.head_delta, atol=ATOL)


def test_report_never_reruns_an_evicted_sweep(page, cache_dir):
    out = run(page)
    request = page._sweep_request(out["data"], "zero", "", "")

    with pytest.raises(ValueError, match="no longer in the cache"):
        page.report_inputs(None, request, [], None, out["data"], False)
    assert "ablate something" in _report_message(page, None, None)


def _report_message(page, request, sweep_request) -> str:
    from components.download import report_download

    payload, message = report_download(
        lambda: page.report_inputs(request, sweep_request, [], None, None, False)
    )
    assert payload is None
    return str(message.children)
