"""Bad input through every door the app has, each answered with a message and never a 500.

The doors: the prompt callbacks of the Attention, Retention, Compare and Ablate pages; URL
parameters, rendered by Dash pages' ``update`` callback and then read by the page's callback on
first load, as a browser does it; the figure download and the prompt-set upload; requests no
page makes; and the command line. Each case asserts a 200 with the page's alert open and a
message that names the problem (or a 4xx), and no traceback; the last test checks the server
still answers a good request after all of them.

Unit-level refusals are tested where they live: tests/analysis/test_prompt.py and
tests/analysis/test_models.py (prompts and model names), tests/components/test_url_state.py
(query values), tests/test_cli.py (the CLI's own cases, which the CLI cases here do not repeat).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

import cli
from analysis.models import DEMO_MODEL
from analysis.settings import REPO_ROOT
from tests.hardening.conftest import alert_text
from tests.hardening.dash_http import initial_values, layout_props

GOOD_PROMPT = "The cat sat on the mat."
LONG_TEXT = "a" * 100_000
OVER_CONTEXT = "cat " * 300  # ~600 tokens, under the character limit; the demo model takes 256


def analyse_attention(http, prompt, model=DEMO_MODEL):
    return http.call(
        "pages.attention",
        "analyse",
        {
            "attention-analyse.n_clicks": 1,
            "attention-prompt.value": prompt,
            "attention-model.value": model,
        },
    )


# --- Prompts -------------------------------------------------------------------------------

REFUSED_PROMPTS = [
    pytest.param("", "the prompt is empty", id="empty"),
    pytest.param(" \t\n  ", "the prompt is empty", id="whitespace"),
    pytest.param(LONG_TEXT, "100,000 characters", id="100k-characters"),
    pytest.param(OVER_CONTEXT, "takes at most 256", id="over-context-length"),
    pytest.param("a\x00b", "U+0000", id="nul"),
    pytest.param("\x1b[31mred", "U+001B", id="ansi-escape"),
    pytest.param("x\x7f", "U+007F", id="delete-char"),
    pytest.param("next\x85line", "U+0085", id="c1-control"),
    pytest.param("ab\udc80", "lone surrogate", id="lone-surrogate"),
    pytest.param(42, "must be text", id="number-not-text"),
    pytest.param({"text": "hi"}, "must be text", id="object-not-text"),
]


@pytest.mark.parametrize(("prompt", "needle"), REFUSED_PROMPTS)
def test_attention_prompt_is_refused_in_the_alert(http, prompt, needle):
    assert needle in alert_text(analyse_attention(http, prompt), "attention-alert")


SHOWN_AS_TEXT = [
    pytest.param("Hi 🦀🔥 👩‍👩‍👧 there", id="emoji"),
    pytest.param("שלום \u202eevil\u202c مرحبا", id="right-to-left"),
    pytest.param("a\u200bb\u200cc\u200dd\ufeffe", id="zero-width"),
    pytest.param("<script>window.__pwned=1</script>", id="script-tag"),
    pytest.param('<img src=x onerror="window.__pwned=2">', id="img-onerror"),
    pytest.param("**bold** [x](javascript:alert(1)) &lt;b&gt;", id="markdown-and-entities"),
]


@pytest.mark.parametrize("prompt", SHOWN_AS_TEXT)
def test_odd_but_valid_prompt_is_analysed_and_shown_as_plain_text(http, prompt):
    reply = analyse_attention(http, prompt)

    assert reply.status == 200 and reply.get("attention-alert.is_open") is False
    chips = reply.get("attention-token-strip.children")["props"]["children"]
    # Every token is a plain button whose only child is a string: nothing is parsed as HTML
    # or Markdown, so the browser shows the characters (tests/browser checks it renders so).
    assert {(chip["namespace"], chip["type"]) for chip in chips} == {
        ("dash_html_components", "Button")
    }
    assert all(isinstance(chip["props"]["children"], str) for chip in chips)
    assert "dangerously" not in reply.text
    if prompt.startswith("<"):
        assert "<" in "".join(chip["props"]["children"] for chip in chips)


MODEL_INPUT = {
    "pages.retention": "retention-model.value",
    "pages.compare": "compare-model.value",
    "pages.ablate": "ablate-model.value",
}
OTHER_PAGES = [
    pytest.param(
        "pages.retention",
        "analyse",
        {"retention-analyse.n_clicks": 1, "retention-prompt.value": "   "},
        "retention-alert",
        "the prompt is empty",
        id="retention-empty",
    ),
    pytest.param(
        "pages.retention",
        "analyse",
        {"retention-analyse.n_clicks": 1, "retention-prompt.value": "tab\tok, nul\x00 not"},
        "retention-alert",
        "U+0000",
        id="retention-nul",
    ),
    pytest.param(
        "pages.compare",
        "compare",
        {
            "compare-run.n_clicks": 1,
            "compare-prompt-a.value": "\x07",
            "compare-prompt-b.value": "x",
        },
        "compare-alert",
        "Prompt A: the prompt contains the control character U+0007",
        id="compare-bell-in-a",
    ),
    pytest.param(
        "pages.compare",
        "compare",
        {
            "compare-run.n_clicks": 1,
            "compare-prompt-a.value": "x",
            "compare-prompt-b.value": LONG_TEXT,
        },
        "compare-alert",
        "Prompt B: the prompt is 100,000 characters",
        id="compare-100k-in-b",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {"ablate-analyse.n_clicks": 1, "ablate-prompt.value": "a\x00"},
        "ablate-alert",
        "U+0000",
        id="ablate-nul",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {
            "ablate-run.n_clicks": 1,
            "ablate-prompt.value": GOOD_PROMPT,
            "ablate-components.value": ["L99H0"],
        },
        "ablate-alert",
        "layer 99 is out of range",
        id="ablate-layer-999",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {
            "ablate-run.n_clicks": 1,
            "ablate-prompt.value": GOOD_PROMPT,
            "ablate-components.value": ["L0H0"],
            "ablate-positions.value": "-3",
        },
        "ablate-alert",
        "positions",
        id="ablate-negative-position",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {
            "ablate-run.n_clicks": 1,
            "ablate-prompt.value": GOOD_PROMPT,
            "ablate-components.value": ["L0H0"],
            "ablate-method.value": "rm -rf",
        },
        "ablate-alert",
        "choose a method",
        id="ablate-unknown-method",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {
            "ablate-run.n_clicks": 1,
            "ablate-prompt.value": GOOD_PROMPT,
            "ablate-components.value": ["<script>"],
        },
        "ablate-alert",
        "is not a component",
        id="ablate-component-not-a-name",
    ),
]


@pytest.mark.parametrize(("module", "name", "values", "alert_id", "needle"), OTHER_PAGES)
def test_other_pages_refuse_bad_input_in_their_alert(http, module, name, values, alert_id, needle):
    values = {MODEL_INPUT[module]: DEMO_MODEL, **values}
    reply = http.call(module, name, values)

    assert needle in alert_text(reply, alert_id)


# --- Model names and paths from the UI ------------------------------------------------------

REFUSED_MODELS = [
    pytest.param("../../etc", "not inside an allowed model directory", id="relative-traversal"),
    pytest.param("/etc/passwd", "not inside an allowed model directory", id="absolute-file"),
    pytest.param("file:///etc/passwd", "unknown model", id="file-url"),
    pytest.param("memlens-demo\x00/../../etc", "NUL", id="nul-in-name"),
    pytest.param("gpt-9-ultra", "unknown model", id="unknown-name"),
    pytest.param(["memlens-demo"], "a model is a name or a path", id="list-not-name"),
]


@pytest.mark.parametrize(("model", "needle"), REFUSED_MODELS)
def test_model_outside_the_allowed_ones_is_refused(http, model, needle):
    assert needle in alert_text(analyse_attention(http, GOOD_PROMPT, model), "attention-alert")


# --- URL parameters: the page as a browser opens it ----------------------------------------

ON_LOAD = {
    "/": ("pages.attention", "analyse", "attention-alert"),
    "/retention": ("pages.retention", "analyse", "retention-alert"),
    "/compare": ("pages.compare", "compare", "compare-alert"),
    "/heads": ("pages.heads", "show_scores", "heads-alert"),
    "/ablate": ("pages.ablate", "run_ablation", "ablate-alert"),
}


def render_page(http, path: str, search: str) -> dict:
    """The props of the layout Dash pages renders for ``path?search``, as a browser gets it."""
    rendered = http.call(
        "dash.dash",
        "update",
        {"_pages_location.pathname": path, "_pages_location.search": search},
    )
    assert rendered.status == 200 and "Traceback" not in rendered.text
    return layout_props(rendered.get("_pages_content.children"))


def open_page(http, path: str, search: str) -> str:
    """Render ``path?search`` and run the page's first callback on what it rendered; the text
    of the page's alert after both (the link's messages, then the analysis's)."""
    props = render_page(http, path, search)
    module, name, alert_id = ON_LOAD[path]
    loaded = http.call(module, name, initial_values(http, props, module, name), changed=[])
    return alert_text(loaded, alert_id)


BAD_LINKS = [
    pytest.param("/", "?layer=999", "layer 999 does not exist", id="layer-999"),
    pytest.param("/", "?head=-1", "head '-1' in the link is not a whole number", id="head-minus-1"),
    pytest.param("/", "?layer=two&head=1e9", "layer 'two'", id="layer-not-a-number"),
    pytest.param("/", "?prompt=hello&token=99999", "token 99999 does not exist", id="token-999"),
    pytest.param("/", "?layer=1&layer=0", "gives 'layer' 2 times", id="repeated-key"),
    pytest.param("/", "?prompt=%00x", "U+0000", id="nul-prompt"),
    pytest.param("/", "?model=..%2F..%2Fetc", "Showing memlens-demo instead", id="model-traversal"),
    pytest.param("/", "?model=%2Fetc%2Fpasswd", "not inside an allowed", id="model-abs-path"),
    pytest.param("/", "?model=file%3A%2F%2F%2Fetc", "unknown model", id="model-file-url"),
    pytest.param("/", "?model=a%00b", "NUL", id="model-nul"),
    pytest.param("/", "?prompt=" + "b" * 30_000, "30,000 characters", id="prompt-30k-chars"),
    pytest.param("/retention", "?pos=-5&prompt=hi+there", "pos '-5'", id="retention-pos"),
    pytest.param("/retention", "?stage=999&prompt=hi", "stage 999 does not exist", id="stage-999"),
    pytest.param("/compare", "?head=abc", "head 'abc'", id="compare-head"),
    pytest.param("/compare", "?model=..%2F..%2F..%2Froot", "not inside an allowed", id="compare-m"),
    pytest.param("/heads", "?model=..%2F..%2Fetc", "not inside an allowed", id="heads-model"),
    pytest.param("/ablate", "?prompt=hi&components=L99H99", "layer 99", id="ablate-components"),
    pytest.param("/ablate", "?prompt=hi&method=evil", "method 'evil'", id="ablate-method"),
]


@pytest.mark.parametrize(("path", "search", "needle"), BAD_LINKS)
def test_bad_link_opens_the_page_with_a_message(http, path, search, needle):
    assert needle in open_page(http, path, search)


def test_unknown_page_answers_with_a_not_found_page(http):
    reply = http.call(
        "dash.dash",
        "update",
        {"_pages_location.pathname": "/../../etc/passwd", "_pages_location.search": "?x=%00"},
    )

    assert reply.status == 200
    assert "Page not found" in str(reply.get("_pages_content.children"))


# --- Figure downloads ----------------------------------------------------------------------

GRAPH = {"graph": "attention-head-figure"}
HEATMAP = {"data": [{"type": "heatmap", "z": [[0.5, 0.5], [1.0, 0.0]]}]}
BAD_DOWNLOADS = [
    pytest.param({"format": "exe", "figure": HEATMAP}, "Cannot download as 'exe'", id="format"),
    pytest.param({"format": "csv", "figure": None}, "no figure here", id="no-figure"),
    pytest.param({"format": "csv", "figure": "<svg onload=x>"}, "no figure here", id="text"),
    pytest.param({"format": "csv", "figure": {"data": []}}, "still empty", id="empty-figure"),
    pytest.param(
        {"format": "png", "figure": HEATMAP, "scale": "big"}, "must be a number", id="scale"
    ),
    pytest.param({"format": "html", "figure": {"data": [{"type": "evil"}]}}, "Invalid", id="trace"),
    pytest.param("csv please", "did not arrive intact", id="request-not-an-object"),
]


@pytest.mark.parametrize(("request_data", "needle"), BAD_DOWNLOADS)
def test_malformed_download_request_gets_a_message_next_to_the_button(http, request_data, needle):
    reply = http.call(
        "components.download",
        "send_figure_file",
        {
            "figure-download-request.data": request_data,
            "figure-download-request.id": {"type": "figure-download-request", **GRAPH},
        },
        match=GRAPH,
    )

    assert reply.status == 200 and "Traceback" not in reply.text
    message = reply.get(
        '{"graph":"attention-head-figure","type":"figure-download-message"}.children'
    )
    assert needle in message and len(message) < 400
    assert not any("figure-download-file" in key for key in reply.outputs)


# --- Prompt-set uploads --------------------------------------------------------------------


def data_url(content: bytes) -> str:
    return "data:text/plain;base64," + base64.b64encode(content).decode()


BAD_UPLOADS = [
    pytest.param("data:text/plain;base64,@@@@", "a.txt", "did not arrive intact", id="bad-base64"),
    pytest.param("no data url at all", "a.txt", "did not arrive intact", id="not-a-data-url"),
    pytest.param(data_url(b"\xff\xfe\x00MZ\x90"), "tool.exe", "is not UTF-8", id="binary"),
    pytest.param([data_url(b"a"), data_url(b"b")], ["a.txt", "b.txt"], "one file", id="two"),
    pytest.param(None, None, "no file was uploaded", id="nothing"),
    pytest.param(data_url(b"x" * 3_000_000), "big.txt", "at most 2 MB", id="3-mb"),
]


@pytest.mark.parametrize(("contents", "filename", "needle"), BAD_UPLOADS)
def test_malformed_upload_is_refused_in_red(http, contents, filename, needle):
    reply = http.call(
        "pages.compare_jobs",
        "read_upload",
        {"compare-set-upload.contents": contents, "compare-set-upload.filename": filename},
    )

    assert reply.status == 200 and "Traceback" not in reply.text
    status = reply.get("compare-set-upload-status.children")
    assert status["props"]["className"] == "text-danger"
    assert needle in status["props"]["children"]
    assert reply.get("compare-set-source.value") == "text"


def test_upload_name_with_a_path_is_only_a_label(http, tmp_path):
    """The name is never opened: a traversal in it reads nothing from the server's disk."""
    reply = http.call(
        "pages.compare_jobs",
        "read_upload",
        {
            "compare-set-upload.contents": data_url(b"first prompt\nsecond prompt\n"),
            "compare-set-upload.filename": "../../../../etc/passwd",
        },
    )

    assert reply.get("compare-set-upload-status.children") == "../../../../etc/passwd: 2 prompts."


# --- Requests no page makes ----------------------------------------------------------------

MALFORMED_POSTS = [
    pytest.param("this is not json", 400, id="not-json"),
    pytest.param("[1, 2, 3]", 400, id="json-list"),
    pytest.param('{"output": "nope.children", "inputs": [], "changedPropIds": []}', 400, id="out"),
    pytest.param("{}", 400, id="empty-object"),
]


@pytest.mark.parametrize(("body", "status"), MALFORMED_POSTS)
def test_malformed_callback_request_is_a_400_not_a_500(http, body, status):
    reply = http.post(body, raw=True)

    assert reply.status == status
    assert "Traceback" not in reply.text


def test_callback_request_with_missing_inputs_is_a_400(http):
    body = http.payload("pages.attention", "analyse", {"attention-analyse.n_clicks": 1})
    body["inputs"] = []

    reply = http.post(body)

    assert reply.status == 400
    assert "could not read this callback request" in reply.text


@pytest.mark.parametrize(
    "url",
    [
        "/_dash-component-suites/../../../etc/passwd",
        "/_dash-component-suites/dash/..%2F..%2F..%2Fetc%2Fpasswd",
        "/assets/../../etc/passwd",
    ],
    ids=["suites-traversal", "suites-encoded-traversal", "assets-traversal"],
)
def test_path_traversal_in_a_static_url_is_a_404(http, url):
    response = http.client.get(url)

    assert response.status_code == 404
    assert "root:" not in response.get_data(as_text=True)


# --- The command line ----------------------------------------------------------------------

CLI_CASES = [
    pytest.param(["analyze", "--prompt", ""], "the prompt is empty", id="empty"),
    pytest.param(["analyze", "--prompt", " \n\t "], "the prompt is empty", id="whitespace"),
    pytest.param(["analyze", "--prompt", LONG_TEXT], "100,000 characters", id="100k"),
    pytest.param(["analyze", "--prompt", OVER_CONTEXT], "takes at most 256", id="over-context"),
    pytest.param(["analyze", "--prompt", "\x1b[2J"], "U+001B", id="escape"),
    pytest.param(["analyze", "--prompt", "x\ud800"], "lone surrogate", id="surrogate"),
    pytest.param(
        ["analyze", "--prompt", "x", "--model", "../../etc"],
        "not a Hugging Face checkpoint",
        id="dir",
    ),
    pytest.param(
        ["analyze", "--prompt", "x", "--model", "/etc/passwd"], "no config.json", id="file"
    ),
    pytest.param(["analyze", "--prompt", "x", "--model", "file:///etc"], "unknown model", id="url"),
    pytest.param(["analyze", "--prompt", "x", "--model", "gpt2\x00"], "NUL", id="model-nul"),
    pytest.param(["export", "--prompt", "x", "--layers", "999"], "out of range", id="layers"),
    pytest.param(["export", "--prompt", "x", "--heads=-1"], "cannot read heads '-1'", id="heads"),
    pytest.param(["export", "--prompt", "x", "--out", "a\x00b"], "NUL", id="out-nul"),
    pytest.param(["export", "--prompt", "x", "--formats", ""], "(none given)", id="no-formats"),
]


@pytest.mark.parametrize(("argv", "needle"), CLI_CASES)
def test_cli_bad_input_exits_2_with_one_line(capsys, memlens_app, argv, needle):
    code = cli.main(argv)
    captured = capsys.readouterr()

    assert code == cli.EXIT_BAD_INPUT, captured.err
    assert "Traceback" not in captured.err
    (line,) = [line for line in captured.err.splitlines() if line.startswith("memlens ")]
    assert needle in line
    assert captured.out == ""


def test_cli_out_that_cannot_be_created_exits_2(capsys, memlens_app):
    code = cli.main(["export", "--prompt", "x", "--formats", "csv", "--out", "/proc/memlens/x"])
    err = capsys.readouterr().err

    assert code == cli.EXIT_BAD_INPUT
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("memlens export: cannot use /proc/memlens")


def test_cli_prompt_that_is_not_utf8_exits_2(tmp_path):
    """A shell hands Python invalid UTF-8 as lone surrogates; the CLI names the byte."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), "analyze", "--prompt", b"caf\xe9"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MEMLENS_CACHE_DIR": str(tmp_path)},
        timeout=120,
    )

    assert result.returncode == cli.EXIT_BAD_INPUT
    assert result.stderr.strip() == (
        "memlens analyze: the prompt contains a lone surrogate U+DCE9 at position 3, which is "
        "not text (a character cut in half); paste the text again"
    )


# --- And the server still serves ---------------------------------------------------------


def test_server_still_answers_a_good_request_after_the_battery(http):
    reply = analyse_attention(http, GOOD_PROMPT)

    assert reply.status == 200
    assert reply.get("attention-alert.is_open") is False
    assert reply.get("attention-analysis.data")["n_pos"] > 1
    download = http.call(
        "components.download",
        "send_figure_file",
        {
            "figure-download-request.data": {"format": "csv", "figure": HEATMAP},
            "figure-download-request.id": {"type": "figure-download-request", **GRAPH},
        },
        match=GRAPH,
    )
    assert download.get('{"graph":"attention-head-figure","type":"figure-download-file"}.data')
