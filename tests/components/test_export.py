"""Figure files and report bundles: HTML, CSV, NPZ, ZIP and manifest; PNG and SVG via kaleido.

Tests marked ``browser`` render through kaleido and the system Chromium.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import threading
import tomllib
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from analysis.bundle import MANIFEST_NAME, ReportInputs
from analysis.settings import REPO_ROOT
from components import export
from components.heatmaps import make_attention_heatmap, make_head_grid
from tests.figures import as_figure

TOKENS = ["<|endoftext|>", "The", " cat", " sat", " on", " the", " mat", "."]
N_LAYERS, N_HEADS = 2, 3
ATOL = 1e-6


def causal_patterns(n_heads: int, n_pos: int, seed: int = 0) -> np.ndarray:
    """Random attention ``[n_heads, pos, pos]`` whose rows sum to 1 over keys <= query."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n_heads, n_pos, n_pos)) * np.tril(np.ones((n_pos, n_pos)))
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float32)


def make_report_inputs() -> ReportInputs:
    """Report inputs of a made-up 2-layer, 3-head model on an 8-token prompt."""
    patterns = {layer: causal_patterns(N_HEADS, len(TOKENS), seed=layer) for layer in (0, 1)}
    n_pos = len(TOKENS)
    return ReportInputs(
        model_id="tiny-test",
        fingerprint="0123456789abcdef",
        prompt="The cat sat on the mat.",
        options={"top_k": 10, "prepend_bos": True, "truncate": False},
        str_tokens=TOKENS,
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        layers=(0, 1),
        heads=None,
        attention=lambda layer: patterns[layer],
        loss=np.linspace(1.0, 3.0, n_pos - 1, dtype=np.float32),
        resid_norms=np.arange((N_LAYERS + 1) * n_pos, dtype=np.float32).reshape(N_LAYERS + 1, -1),
        lens_rank=np.array([[0, 5, 999, 3, 0, 1, 2, 7]] * (N_LAYERS + 1), dtype=np.int64),
    )


@pytest.fixture
def inputs() -> ReportInputs:
    return make_report_inputs()


@pytest.fixture
def heatmap():
    figure = make_attention_heatmap(causal_patterns(1, len(TOKENS))[0], TOKENS, title="L0 H0")
    return as_figure(figure)


def png_size(content: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk."""
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", content[16:24])


# --- HTML --------------------------------------------------------------------------------------


def test_figure_html_inlines_plotly_and_loads_nothing_from_the_network(heatmap):
    page = export.figure_html(heatmap, title="a <b> title").decode()

    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    assert "Plotly.newPlot" in page
    assert len(page) > 1_000_000  # plotly.js itself is inside
    assert "<title>a &lt;b&gt; title</title>" in page


def test_report_html_holds_plotly_once_and_every_figure(inputs):
    figures = export.report_figures(inputs)

    page = export.report_html(figures, inputs, created="2025-01-01T00:00:00Z", version="9")
    text = page.decode()

    assert not re.search(r"<script[^>]*\bsrc\s*=", text)
    assert text.count("Plotly.newPlot(") == len(figures)
    assert text.count(get_plotlyjs()[:500]) == 1


def test_report_html_escapes_the_prompt(inputs):
    hostile = ReportInputs(**{**inputs.__dict__, "prompt": "</pre><script>alert(1)</script>"})

    text = export.report_html([], hostile, created="t", version="v").decode()

    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


# --- Data --------------------------------------------------------------------------------------


def test_figure_arrays_name_each_trace_field_and_keep_the_values(heatmap):
    arrays = export.figure_arrays(heatmap)

    assert set(arrays) == {"trace0_x", "trace0_y", "trace0_z"}
    np.testing.assert_allclose(arrays["trace0_z"], heatmap.data[0].z, atol=ATOL)
    assert arrays["trace0_x"].dtype.kind == "U"
    assert arrays["trace0_x"].tolist() == list(heatmap.data[0].x)


def test_npz_loads_without_pickle_and_matches_the_arrays(inputs):
    grid = make_head_grid(inputs.attention(0), layer=0)

    loaded = np.load(io.BytesIO(export.figure_npz(grid)), allow_pickle=False)

    expected = export.figure_arrays(grid)
    assert sorted(loaded.files) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_csv_has_one_row_per_heatmap_cell_with_gaps_left_empty(heatmap):
    rows = list(csv.DictReader(io.StringIO(export.figure_csv(heatmap).decode())))

    z = np.asarray(heatmap.data[0].z)
    assert len(rows) == z.size
    by_cell = {(r["y"], r["x"]): r["z"] for r in rows}
    labels = list(heatmap.data[0].x)
    for row in range(z.shape[0]):
        for col in range(z.shape[1]):
            cell = by_cell[(labels[row], labels[col])]
            if np.isnan(z[row, col]):
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(float(z[row, col]), abs=ATOL)


def test_csv_of_a_bar_chart_has_one_row_per_bar(inputs):
    figure = export.make_loss_figure(inputs.loss, inputs.str_tokens)

    rows = list(csv.DictReader(io.StringIO(export.figure_csv(figure).decode())))

    assert [float(r["y"]) for r in rows] == pytest.approx(inputs.loss.tolist(), abs=ATOL)
    assert rows[0]["x"].startswith("1 ")  # the first prediction is of token 1
    assert {r["z"] for r in rows} == {""}


def test_send_figure_returns_what_dcc_send_bytes_returns(heatmap):
    payload = export.send_figure(heatmap, "csv", filename="layer 0 / head 1")

    assert payload["base64"] is True
    assert payload["filename"] == "layer-0-head-1.csv"
    assert payload["type"] == "text/csv"
    assert base64.b64decode(payload["content"]) == export.figure_csv(heatmap)


# --- Checks and missing dependencies ----------------------------------------------------------


@pytest.mark.parametrize("scale", [0, 0.1, 9, float("nan"), True, "2"])
def test_scale_outside_the_allowed_range_is_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        export.check_scale(scale)


def test_formats_are_read_from_text_and_unknown_ones_refused():
    assert export.check_formats("png, SVG,png") == ("png", "svg")
    with pytest.raises(ValueError, match="gif"):
        export.check_formats("png,gif")
    with pytest.raises(ValueError, match="none given"):
        export.check_formats(" , ")


def test_missing_chromium_says_how_to_install_it(heatmap, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(export, "_renderer", export._Renderer())

    with pytest.raises(export.ExportUnavailableError, match="apt-get install -y chromium"):
        export.figure_image(heatmap, "png")


def test_a_browser_path_set_by_the_user_is_used_and_checked(heatmap, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    monkeypatch.setattr(export, "_renderer", export._Renderer())

    with pytest.raises(export.ExportUnavailableError, match="BROWSER_PATH='/nonexistent/chrome'"):
        export.figure_image(heatmap, "png")


def test_browser_path_defaults_to_the_offline_wrapper(monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("CHROMIUM", "/bin/true")

    assert export.browser_path() == str(export.CHROMIUM_WRAPPER)
    assert os.environ["BROWSER_PATH"] == str(export.CHROMIUM_WRAPPER)


def test_offline_wrapper_adds_the_offline_flags_and_passes_arguments_on():
    result = subprocess.run(
        [str(export.CHROMIUM_WRAPPER), "--remote-debugging-pipe", "file:///x.html"],
        env={**os.environ, "CHROMIUM": "/bin/echo"},
        capture_output=True,
        text=True,
        check=True,
    )

    words = result.stdout.split()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--dns-prefetch-disable",
    ):
        assert flag in words
    assert "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1" in (
        result.stdout
    )
    assert words[-2:] == ["--remote-debugging-pipe", "file:///x.html"]


def test_offline_wrapper_without_chromium_fails_with_the_install_command():
    result = subprocess.run(
        [str(export.CHROMIUM_WRAPPER)],
        env={**os.environ, "CHROMIUM": "/nonexistent/chromium"},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 127
    assert "apt-get install -y chromium" in result.stderr


# --- Figures only the bundle has ---------------------------------------------------------------


def test_loss_figure_refuses_a_loss_of_the_wrong_length():
    with pytest.raises(ValueError, match="pos - 1"):
        export.make_loss_figure(np.zeros(3), ["a", "b"])


def test_rank_heatmap_colours_by_log_rank_and_keeps_the_ranks(inputs):
    figure = export.make_stage_heatmap(
        inputs.lens_rank, inputs.str_tokens, title="ranks", colorbar="rank", log_rank=True
    )
    figure = as_figure(figure)

    trace = figure.data[0]
    np.testing.assert_array_equal(trace.customdata, inputs.lens_rank)
    np.testing.assert_allclose(trace.z, np.log10(1 + inputs.lens_rank), atol=ATOL)
    assert list(trace.y) == ["embed", "after L0", "after L1"]


def test_report_has_overview_a_grid_per_layer_loss_and_retention(inputs):
    names = [item.name for item in export.report_figures(inputs)]

    assert names == [
        "overview",
        "attention-L0",
        "attention-L1",
        "loss",
        "resid-norm",
        "lens-rank",
    ]


def test_report_with_chosen_heads_shows_each_head_with_its_own_pattern(inputs):
    chosen = ReportInputs(**{**inputs.__dict__, "layers": (1,), "heads": (2, 0)})

    figures = {item.name: item.figure for item in export.report_figures(chosen)}

    assert [n for n in figures if n.startswith("attention")] == [
        "attention-L1-H2",
        "attention-L1-H0",
    ]
    pattern = inputs.attention(1)[2]
    z = np.asarray(figures["attention-L1-H2"].data[0].z)
    lower = np.tril(np.ones_like(pattern, dtype=bool))
    np.testing.assert_allclose(z[lower], pattern[lower], atol=ATOL)
    assert np.isnan(z[~lower]).all()


# --- Bundles ------------------------------------------------------------------------------------


def test_bundle_manifest_lists_every_file_with_its_sha256(inputs):
    content, manifest = export.build_bundle(inputs, formats=["html", "csv", "npz"])

    archive = zipfile.ZipFile(io.BytesIO(content))
    stored = json.loads(archive.read(MANIFEST_NAME))
    assert stored == manifest
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert set(archive.namelist()) == set(listed) | {MANIFEST_NAME}
    for name, entry in listed.items():
        data = archive.read(name)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert {"report.html", "html/plotly.min.js", "data/overview.csv", "data/loss.npz"} <= set(
        listed
    )


def test_bundle_manifest_says_what_made_it(inputs):
    _, manifest = export.build_bundle(inputs, formats=["csv"], scale=3)

    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    assert manifest["app_version"] == version
    assert manifest["model"] == "tiny-test"
    assert manifest["weights_fingerprint"] == "0123456789abcdef"
    assert manifest["prompts"] == ["The cat sat on the mat."]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_utc"])
    assert manifest["settings"]["formats"] == ["csv"]
    assert manifest["settings"]["scale"] == 3
    assert manifest["settings"]["layers"] == [0, 1]
    assert manifest["settings"]["heads"] is None


def test_bundle_html_pages_load_plotly_from_the_bundle_only(inputs):
    content, _ = export.build_bundle(inputs, formats=["html"])

    archive = zipfile.ZipFile(io.BytesIO(content))
    page = archive.read("html/loss.html").decode()
    assert re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", page) == ["plotly.min.js"]


def test_bundle_progress_counts_up_to_its_total(inputs):
    calls = []

    export.build_bundle(inputs, formats=["csv", "npz"], progress=lambda *a: calls.append(a))

    assert [done for done, _, _ in calls] == list(range(1, len(calls) + 1))
    assert {total for _, total, _ in calls} == {len(calls)}
    assert calls[-1][2] == "report.html"


def test_write_bundle_leaves_no_partial_zip_when_writing_fails(inputs, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("analysis.bundle.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        export.write_bundle(inputs, tmp_path / "out", formats=["csv"])

    assert list((tmp_path / "out").iterdir()) == []


def test_write_bundle_refuses_a_file_as_directory(inputs, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")

    with pytest.raises(ValueError, match="is a file"):
        export.write_bundle(inputs, target, formats=["csv"])


def test_send_bundle_is_a_zip_download(inputs):
    payload = export.send_bundle(inputs, formats=["csv"])

    assert payload["filename"].startswith("memlens-tiny-test-")
    assert payload["filename"].endswith(".zip")
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(payload["content"])))
    assert MANIFEST_NAME in archive.namelist()


# --- PNG and SVG through kaleido --------------------------------------------------------------


@pytest.mark.browser
def test_png_has_the_figure_size_times_the_scale(heatmap):
    content = export.figure_image(heatmap, "png", scale=1.5, width=400)

    assert png_size(content) == (600, int(heatmap.layout.height * 1.5))


@pytest.mark.browser
def test_svg_parses_and_has_the_figure_size_times_the_scale(heatmap):
    content = export.figure_image(heatmap, "svg", scale=2, width=500, height=300)

    root = ET.fromstring(content)
    assert root.tag.endswith("svg")
    assert (float(root.get("width")), float(root.get("height"))) == (1000, 600)


@pytest.mark.browser
def test_bundle_with_images_holds_pngs_of_the_requested_scale(inputs):
    content, _ = export.build_bundle(inputs, formats=["png", "svg"], scale=1)

    archive = zipfile.ZipFile(io.BytesIO(content))
    loss = export.make_loss_figure(inputs.loss, inputs.str_tokens)
    assert png_size(archive.read("png/loss.png")) == export.image_size(loss)
    ET.fromstring(archive.read("svg/overview.svg"))


@pytest.mark.browser
def test_threads_rendering_at_once_each_get_their_own_image(heatmap):
    widths = (300, 400, 500, 600)
    images = {}

    def render(width: int) -> None:
        images[width] = export.figure_image(heatmap, "png", scale=1, width=width)

    threads = [threading.Thread(target=render, args=(width,)) for width in widths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)

    assert [png_size(images[width])[0] for width in widths] == list(widths)
