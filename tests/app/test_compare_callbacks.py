"""Compare page callbacks called as plain functions, on the embedded demo model.

Background callbacks (patching, prompt sets) are called directly with a fake ``set_progress``
that records what the progress bar would show.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qs

import numpy as np
import pytest
from dash import dcc, no_update

import analysis
from analysis.compare import align_tokens
from analysis.patching import activation_patch, suggest_answer_tokens
from analysis.prompt_sets import run_prompt_set
from components.compare import signed_block_extreme
from components.tokens import SELECTED_TOKEN_CLASS, TOKEN_CLASS
from tests.conftest import ATOL
from tests.figures import as_figure

MODEL = analysis.DEMO_MODEL
PROMPT = "The cat sat on the mat. The cat sat on the"
CORRUPTED = "The cat sat on the hat. The cat sat on the"
# B is A with words put in front: more tokens, and the tail of B is exactly A's tail.
LONGER = "Once upon a time, the cat sat on the mat. The cat sat on the"
COMPARE_OUTPUTS = (
    "data",
    "layer_options",
    "layer",
    "head_options",
    "head",
    "strip_a",
    "strip_b",
    "token",
    "alert",
    "alert_open",
    "model",
)


@pytest.fixture
def compare_page(memlens_app, cache_dir):
    """The Compare page module, with a fresh analysis cache for this test."""
    from pages import compare

    return compare


@pytest.fixture
def jobs(compare_page):
    from pages import compare_jobs

    return compare_jobs


def compare(page, prompt_a=PROMPT, prompt_b=CORRUPTED, *, align="end", clicks=1, request=None):
    values = page.compare(clicks, align, prompt_a, prompt_b, MODEL, "0", "0", request)
    return dict(zip(COMPARE_OUTPUTS, values, strict=True))


def finite(figure) -> np.ndarray:
    z = np.asarray(as_figure(figure).data[0].z, dtype=np.float32)
    return z[np.isfinite(z)]


# --- Side by side ----------------------------------------------------------------------------


def test_comparing_a_prompt_with_itself_shows_zero_difference_everywhere(compare_page):
    out = compare(compare_page, PROMPT, PROMPT)
    data = out["data"]

    assert out["alert_open"] is False
    n_pos = data["n_pos_a"]
    assert data["pairs"] == [[i, i] for i in range(n_pos)]
    for layer in range(data["n_layers"]):
        for head in range(data["n_heads"]):
            *_, difference, caption = compare_page.show_attention(
                data, str(layer), str(head), None, False
            )
            shown = finite(difference)
            assert shown.size == n_pos * (n_pos + 1) // 2  # every causal cell is drawn
            assert np.all(shown == 0.0)
    for measure in ("cosine", "norm"):
        *_, difference = compare_page.show_retention(data, measure, None, False)
        assert finite(difference).size == (data["n_layers"] + 1) * n_pos
        assert np.all(finite(difference) == 0.0)
    assert caption == (
        f"A − B on {MODEL}, layer {data['n_layers'] - 1} head {data['n_heads'] - 1}, "
        f"position by position ({n_pos} of {n_pos} paired)"
    )


def test_one_changed_token_shows_in_the_difference_from_that_position_on(compare_page):
    data = compare(compare_page)["data"]
    pa_a = analysis.analyze(PROMPT, MODEL)
    pa_b = analysis.analyze(CORRUPTED, MODEL)
    changed = int(np.flatnonzero(pa_a.tokens != pa_b.tokens)[0])

    *_, difference = compare_page.show_retention(data, "norm", None, False)
    difference = as_figure(difference)

    z = np.asarray(difference.data[0].z)
    # Causal model: nothing before the changed token can differ, at any layer.
    np.testing.assert_allclose(z[:, :changed], 0.0, atol=ATOL)
    # The changed token enters with another embedding.
    assert abs(z[0, changed]) > ATOL


@pytest.mark.parametrize("align", ["end", "match"])
def test_mismatched_token_counts_are_compared_over_an_explicit_alignment(compare_page, align):
    out = compare(compare_page, PROMPT, LONGER, align=align)
    data = out["data"]
    pa_a, pa_b = analysis.analyze(PROMPT, MODEL), analysis.analyze(LONGER, MODEL)

    assert pa_a.n_pos != pa_b.n_pos
    pairs = align_tokens(pa_a.str_tokens, pa_b.str_tokens, align)
    assert data["pairs"] == [list(p) for p in pairs]
    assert 0 < len(pairs) <= min(pa_a.n_pos, pa_b.n_pos)

    *_, difference, caption = compare_page.show_attention(data, "1", "2", None, False)
    difference = as_figure(difference)

    # Row n, column m is A's attention between its paired positions minus B's.
    index_a = [i for i, _ in pairs]
    index_b = [j for _, j in pairs]
    expected = (
        pa_a.attention(1)[2][np.ix_(index_a, index_a)]
        - pa_b.attention(1)[2][np.ix_(index_b, index_b)]
    )
    z = np.asarray(difference.data[0].z, dtype=np.float32)
    lower = np.tril(np.ones_like(expected, dtype=bool))
    np.testing.assert_allclose(z[lower], expected[lower], atol=ATOL)
    title = {"end": "by position from the end", "match": "by matching tokens"}[align]
    assert caption == (
        f"A − B on {MODEL}, layer 1 head 2, aligned {title} ({len(pairs)} paired; "
        f"A has {pa_a.n_pos} tokens, B {pa_b.n_pos})"
    )


def test_a_selected_token_selects_its_partner_in_the_other_prompt(compare_page):
    data = compare(compare_page, PROMPT, LONGER, align="match")["data"]
    paired_a = {i: j for i, j in data["pairs"]}
    unpaired_b = next(j for j in range(data["n_pos_b"]) if j not in paired_a.values())
    i, j = data["pairs"][-1]

    assert compare_page.selected_positions(data, {"side": "a", "pos": i}) == (
        i,
        j,
        len(data["pairs"]) - 1,
    )
    assert compare_page.selected_positions(data, {"side": "b", "pos": unpaired_b}) == (
        None,
        unpaired_b,
        None,
    )
    assert compare_page.selected_positions(data, {"side": "a", "pos": 999}) == (None, None, None)

    ids_a = [{"index": k} for k in range(data["n_pos_a"])]
    ids_b = [{"index": k} for k in range(data["n_pos_b"])]
    classes_a, classes_b = compare_page.mark_tokens({"side": "a", "pos": i}, data, ids_a, ids_b)
    assert [k for k, c in enumerate(classes_a) if c == SELECTED_TOKEN_CLASS] == [i]
    assert [k for k, c in enumerate(classes_b) if c == SELECTED_TOKEN_CLASS] == [j]
    assert set(classes_a + classes_b) == {SELECTED_TOKEN_CLASS, TOKEN_CLASS}


def test_a_refused_prompt_is_named_in_the_alert_and_the_view_kept(compare_page):
    out = compare(compare_page, PROMPT, "bad \x07 bell")

    assert out["alert_open"] is True
    assert out["alert"].startswith("Prompt B:")
    assert "control character" in out["alert"]
    assert out["data"] is no_update


def test_prompt_text_reaches_the_page_only_as_text(compare_page):
    markup = "<b>bold</b> <script>x</script>"
    out = compare(compare_page, markup, markup)

    chips = out["strip_a"].children
    assert all(isinstance(chip.children, str) for chip in chips)
    heatmap, *_ = compare_page.show_attention(out["data"], "0", "0", None, False)
    heatmap = as_figure(heatmap)
    labels = " ".join(heatmap.data[0].x)
    assert "<b>" not in labels and "<script>" not in labels
    assert "&lt;" in labels


# --- URL -------------------------------------------------------------------------------------


def test_the_url_reopens_the_same_view(compare_page):
    data = compare(compare_page, PROMPT, LONGER, align="match")["data"]

    search = compare_page.compare_search(data, "2", "3", "patching")
    query = {key: values[0] for key, values in parse_qs(search.removeprefix("?")).items()}
    state, messages = compare_page.parse_compare_query(query, default_model="other")

    assert messages == []
    assert (state.model, state.prompt_a, state.prompt_b) == (MODEL, PROMPT, LONGER)
    assert (state.layer, state.head, state.align, state.tab) == (2, 3, "match", "patching")


def test_bad_url_values_fall_back_to_defaults_with_a_message(compare_page):
    query = {"layer": "-1", "head": "two", "align": "diagonal", "tab": "<img>", "prompt_a": []}

    state, messages = compare_page.parse_compare_query(query, default_model=MODEL)

    assert (state.layer, state.head, state.align, state.tab) == (0, 0, "end", "pair")
    assert state.prompt_a == compare_page.DEFAULT_PROMPT_A
    assert len(messages) == 5
    assert any("align 'diagonal'" in m for m in messages)


def test_a_link_with_bad_values_still_renders_with_an_open_alert(compare_page):
    page = compare_page.layout(layer="x", model="no-such-model", align="zz")
    alert = next(c for c in page.children if getattr(c, "id", None) == compare_page.ALERT)
    assert alert.is_open is True

    request = {"messages": ["layer 'x' in the link is not a whole number ≥ 0; using 0"]}
    values = compare_page.compare(0, "end", PROMPT, PROMPT, "no-such-model", "0", "0", request)
    out = dict(zip(COMPARE_OUTPUTS, values, strict=True))
    assert out["model"] == MODEL  # the link's unknown model falls back to the default
    assert "unknown model 'no-such-model'" in out["alert"]
    assert "layer 'x'" in out["alert"]
    assert out["data"]["model"] == MODEL


# --- Activation patching ---------------------------------------------------------------------


def test_suggested_answers_fill_the_answer_boxes(compare_page, jobs):
    data = compare(compare_page)["data"]

    clean, corrupted, hint = jobs.suggest_answers(data)

    first = suggest_answer_tokens(PROMPT, CORRUPTED, MODEL)[0]
    assert (clean, corrupted) == (first.clean, first.corrupted)
    assert repr(first.clean) in hint


def test_patching_job_returns_a_heatmap_per_sweep_with_progress(compare_page, jobs):
    data = compare(compare_page)["data"]
    kinds = ["resid_pre", "attn_out", "head_out_all_pos", "head_out_by_pos"]
    progress: list = []

    children, caption, alert, alert_open = jobs.run_patching(
        progress.append, 1, data, " m", " h", kinds, "1", False
    )

    assert alert_open is False
    graphs = [child for child in children if isinstance(child, dcc.Graph)]
    assert [graph.id["kind"] for graph in graphs] == kinds
    assert len(children) == 2 * len(kinds)  # each heatmap has its download toolbar
    for graph, kind in zip(graphs, kinds, strict=True):
        expected = activation_patch(PROMPT, CORRUPTED, (" m", " h"), kind, MODEL, layer=1)
        values = expected.values.T if kind == "head_out_by_pos" else expected.values
        np.testing.assert_allclose(np.asarray(as_figure(graph.figure).data[0].z), values, atol=ATOL)
    resid = np.asarray(as_figure(graphs[0].figure).data[0].z)
    assert resid.shape == (data["n_layers"], data["n_pos_a"])
    # The positions carry the tokens, both prompts' where they differ.
    assert any("·m | ·h" in label for label in as_figure(graphs[0].figure).data[0].x)
    shares = [value for value, _, _ in progress]
    assert shares == sorted(shares) and progress[-1] == (100, 100, "done")
    assert "' m'" in caption and "' h'" in caption


def test_patching_job_refuses_prompts_of_different_lengths(compare_page, jobs):
    data = compare(compare_page, PROMPT, LONGER)["data"]

    results, _, alert, alert_open = jobs.run_patching(
        lambda _: None, 1, data, " m", " h", ["resid_pre"], "0", False
    )

    assert results is no_update
    assert alert_open is True
    assert "equal length" in alert


def test_patching_job_reports_an_answer_that_is_not_one_token(compare_page, jobs):
    data = compare(compare_page)["data"]

    _, _, alert, alert_open = jobs.run_patching(
        lambda _: None, 1, data, " mat and more", " h", ["head_out_all_pos"], "0", False
    )

    assert alert_open is True
    assert "single token" in alert


# --- Prompt sets -----------------------------------------------------------------------------


def data_url(content: bytes, mime: str = "text/csv") -> str:
    return f"data:{mime};base64," + base64.b64encode(content).decode()


CSV = (
    b"id,prompt\n"
    b"1,The cat sat on the mat. The cat sat on the\n"
    b"2,\n"
    b"3,bad \x07 bell\n"
    b"4,Once upon a time\n"
)


def test_an_upload_with_bad_rows_reports_their_line_numbers(compare_page, jobs):
    status, source = jobs.read_upload(data_url(CSV), "set.csv")

    assert source == "file"
    assert status == "set.csv: 2 prompts; 2 rows will be skipped (line 3, 4)."


def test_an_upload_that_is_not_utf8_is_refused(compare_page, jobs):
    status, source = jobs.read_upload(data_url(b"\xff\xfe\x00bad"), "set.txt")

    assert source == "text"
    assert "not UTF-8" in status.children


def test_prompt_set_job_skips_bad_rows_and_measures_the_rest(compare_page, jobs):
    progress: list = []
    measures = ["mean_loss", "best_induction_attention", "head_attention"]

    out = jobs.run_set(
        progress.append, 1, "file", "", data_url(CSV), "set.csv", measures, "cat", "1", "2", MODEL
    )
    columns, rows, _, options, chart, bad, bad_open, alert, alert_open = out

    assert alert_open is False
    assert [row["line"] for row in rows] == [2, 5]
    assert bad_open is True
    items = bad.children[1].children
    assert [item.children.split(":")[0] for item in items] == ["line 3", "line 4"]
    assert progress[-1] == (2, 2, "2/2")
    # The table holds what the analysis layer computes for the same prompts.
    expected = run_prompt_set(
        [row["prompt"] for row in rows],
        MODEL,
        ["mean_loss", "best_induction_attention", analysis_head_measure()],
    )
    for row, want in zip(rows, expected.rows, strict=True):
        assert row["mean_loss"] == pytest.approx(want["mean_loss"], abs=ATOL)
        assert row["head_attention_0"] == pytest.approx(want["head_attention_0"], abs=ATOL)
    assert "head_attention_0" in [c["id"] for c in columns]
    assert chart == "mean_loss"
    assert {o["value"] for o in options} >= {"mean_loss", "head_attention_0"}

    figure = jobs.show_set_chart(rows, "mean_loss", False, columns)
    figure = as_figure(figure)
    np.testing.assert_allclose(figure.data[0].y, [row["mean_loss"] for row in rows], atol=ATOL)


def analysis_head_measure():
    from analysis.prompt_sets import HeadAttentionMeasure

    return HeadAttentionMeasure(1, 2, "cat")


def test_prompt_set_job_needs_prompts_and_a_measure(compare_page, jobs):
    out = jobs.run_set(
        lambda _: None, 1, "text", "  ", None, None, ["mean_loss"], "", "0", "0", MODEL
    )
    assert out[-1] is True and "paste some prompts" in out[-2]

    out = jobs.run_set(lambda _: None, 1, "text", "a prompt", None, None, [], "", "0", "0", MODEL)
    assert out[-1] is True and "at least one measure" in out[-2]


# --- Builders --------------------------------------------------------------------------------


def test_blocked_differences_keep_the_strongest_change_of_either_sign():
    array = np.array(
        [[0.1, -0.5, 0.2, 0.0], [0.3, 0.2, np.nan, 0.4], [0.0, 0.0, -0.1, 0.05], [0, 0, 0, 0]]
    )
    starts = np.array([0, 2])

    blocked = signed_block_extreme(array, starts, starts)

    np.testing.assert_allclose(blocked, [[-0.5, 0.4], [0.0, -0.1]])


# --- Report bundle ---------------------------------------------------------------------------


def test_report_bundles_the_six_side_by_side_views_and_both_prompts(compare_page):
    import io
    import json
    import zipfile

    from components.export import build_bundle

    data = compare(compare_page)["data"]
    report = compare_page.report_inputs(data, "1", "2", None, "norm", False)

    content, manifest = build_bundle(report, formats=["html", "csv"])

    assert manifest["prompts"] == [PROMPT, CORRUPTED]
    assert manifest["settings"]["layer"] == 1 and manifest["settings"]["head"] == 2
    assert manifest["settings"]["retention_measure"] == "norm"
    names = [item.name for item in report.figures]
    assert names == [
        "attention-a",
        "attention-b",
        "attention-a-minus-b",
        "retention-a",
        "retention-b",
        "retention-a-minus-b",
    ]
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        listed = {item["path"] for item in manifest["files"]}
        assert set(archive.namelist()) == listed | {"manifest.json"}
        assert json.loads(archive.read("manifest.json")) == manifest
        page = archive.read("report.html").decode()
    assert "Prompt B (corrupted)" in page and "The cat sat on the hat." in page
    assert {f"html/{name}.html" for name in names} <= listed
    # The attention CSV holds the chosen head's pattern on A, one row per cell.
    pattern = analysis.analyze(PROMPT, MODEL).attention(1)[2]  # [q_pos, k_pos]
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        rows = archive.read("data/attention-a.csv").decode().splitlines()[1:]
    z = np.array([float(row.rsplit(",", 1)[1] or "nan") for row in rows]).reshape(pattern.shape)
    shown = np.isfinite(z)
    np.testing.assert_allclose(z[shown], pattern[shown], atol=1e-3)
    assert shown[np.tril_indices(len(pattern))].all()  # every causal cell is there


def test_report_without_a_comparison_says_what_to_do(compare_page):
    from components.download import report_download

    payload, message = report_download(
        lambda: compare_page.report_inputs(None, "0", "0", None, "cosine", False)
    )

    assert payload is None
    assert "compare two prompts first" in str(message.children)
