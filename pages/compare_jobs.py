"""The Compare page's long jobs: activation patching and prompt sets, as background callbacks.

Both run in a worker process of the app's ``DiskcacheManager`` (set in ``app.py``), report
progress to a ``dbc.Progress`` bar, disable their Run button while running and stop when Cancel
is pressed (the manager ends the worker process; results already cached stay cached). Every
result is cached by the analysis layer: a patching sweep by ``activation_patch`` and every
prompt of a set by ``analyze``, so running the same job again is a cache read.

This module also declares the component ids that the Compare page and its jobs share. It is
imported by ``pages/compare.py``; Dash's page loader skips it because it registers no page.
"""

import base64
import binascii
import logging

import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, dcc, html, no_update

from analysis.patching import PATCH_KINDS, activation_patch, suggest_answer_tokens
from analysis.prompt_sets import (
    BUILTIN_MEASURES,
    DEFAULT_MAX_PROMPTS,
    HeadAttentionMeasure,
    PromptSet,
    parse_prompt_file,
    parse_prompt_text,
    run_prompt_set,
)
from components.alerts import alert_update, make_error_alert
from components.compare import (
    make_bad_rows_list,
    make_measure_chart,
    make_measure_table,
    make_patching_heatmap,
    pair_axis_labels,
    table_columns,
)
from components.download import make_figure_download
from components.heatmaps import make_empty_figure
from components.jobs import limited_job
from components.shell import COLOR_MODE_SWITCH
from components.url_state import as_index

logger = logging.getLogger(__name__)

# --- Component ids shared by the whole Compare page, declared once ------------------------------
COMPARED = "compare-data"  # store: what was last compared (model, prompts, sizes, alignment)
MODEL = "compare-model"
LAYER = "compare-layer"
HEAD = "compare-head"

# Patching tab.
PATCH_ALERT = "compare-patch-alert"
CLEAN_ANSWER = "compare-clean-answer"
CORRUPTED_ANSWER = "compare-corrupted-answer"
ANSWER_HINT = "compare-answer-hint"
PATCH_KINDS_CHECK = "compare-patch-kinds"
PATCH_RUN = "compare-patch-run"
PATCH_CANCEL = "compare-patch-cancel"
PATCH_PROGRESS = "compare-patch-progress"
PATCH_CAPTION = "compare-patch-caption"
PATCH_RESULTS = "compare-patch-results"

# Prompt-set tab.
SET_ALERT = "compare-set-alert"
SET_TEXT = "compare-set-text"
SET_UPLOAD = "compare-set-upload"
# Largest prompt-set file read: room for the prompts a set runs, and no more in memory.
MAX_UPLOAD_BYTES = 2_000_000
SET_UPLOAD_STATUS = "compare-set-upload-status"
SET_SOURCE = "compare-set-source"
SET_MEASURES = "compare-set-measures"
SET_TOKEN = "compare-set-token"
SET_RUN = "compare-set-run"
SET_CANCEL = "compare-set-cancel"
SET_PROGRESS = "compare-set-progress"
SET_BAD_ROWS = "compare-set-bad-rows"
SET_TABLE = "compare-set-table"
SET_CHART = "compare-set-chart"
SET_CHART_MEASURE = "compare-set-chart-measure"

KIND_TITLES = {
    "resid_pre": "Residual stream entering each layer (resid_pre), per position",
    "attn_out": "Attention output of each layer, per position",
    "head_out_all_pos": "Each head's output, all positions at once",
    "head_out_by_pos": "Each head's output per position, in the layer chosen above",
}
DEFAULT_KINDS = ["resid_pre", "attn_out", "head_out_all_pos"]
MEASURE_TITLES = {
    "mean_loss": "Mean loss",
    "repeated_token_loss": "Loss on repeated tokens",
    "best_induction_attention": "Best induction-head attention",
    "head_attention": "Attention of the chosen head, from the last token to:",
}
DEFAULT_MEASURES = ["mean_loss", "repeated_token_loss", "best_induction_attention"]
SET_PLACEHOLDER = "Paste prompts here, one per line"


def _run_buttons(run_id: str, run_text: str, cancel_id: str, progress_id: str) -> html.Div:
    """Run and Cancel buttons with the job's progress bar beside them."""
    return html.Div(
        [
            dbc.Button(run_text, id=run_id, color="primary", n_clicks=0),
            dbc.Button("Cancel", id=cancel_id, color="secondary", outline=True, disabled=True),
            dbc.Progress(id=progress_id, value=0, max=1, striped=True, class_name="flex-grow-1"),
        ],
        className="d-flex gap-2 align-items-center my-3",
    )


# --- Activation patching ---------------------------------------------------------------------


def patching_tab() -> html.Div:
    """Answer tokens, the sweeps to run, Run/Cancel with progress, and the result heatmaps."""
    answers = html.Div(
        [
            dbc.InputGroup(
                [dbc.InputGroupText("Clean answer (A)"), dbc.Input(id=CLEAN_ANSWER, value="")],
                size="sm",
                class_name="w-auto",
            ),
            dbc.InputGroup(
                [
                    dbc.InputGroupText("Corrupted answer (B)"),
                    dbc.Input(id=CORRUPTED_ANSWER, value=""),
                ],
                size="sm",
                class_name="w-auto",
            ),
        ],
        className="d-flex flex-wrap gap-2",
    )
    kinds = dbc.Checklist(
        id=PATCH_KINDS_CHECK,
        options=[{"label": title, "value": kind} for kind, title in KIND_TITLES.items()],
        value=DEFAULT_KINDS,
        class_name="mt-2 small",
    )
    return html.Div(
        [
            make_error_alert(PATCH_ALERT),
            html.P(
                [
                    "Runs prompt B (corrupted) with one activation at a time taken from prompt A "
                    "(clean), and measures the logit difference between the two answer tokens at "
                    "the last position. ",
                    html.Strong("0 = B's behaviour, 1 = A's"),
                    ". Both prompts need the same number of tokens.",
                ],
                className="small mb-2",
            ),
            answers,
            html.Small(id=ANSWER_HINT, className="text-body-secondary d-block mt-1"),
            kinds,
            _run_buttons(PATCH_RUN, "Run patching", PATCH_CANCEL, PATCH_PROGRESS),
            html.Div(id=PATCH_CAPTION, className="small mb-2"),
            dcc.Loading(html.Div(id=PATCH_RESULTS), delay_show=400, type="circle"),
        ]
    )


def answer_hint(pairs: list) -> str:
    """Plain text listing the suggested answer pairs (first one filled in)."""
    if not pairs:
        return (
            "No suggestion: the prompts predict the same token and have no differing token. "
            "Type two single tokens."
        )
    sources = {"top_prediction": "top predictions", "first_difference": "first differing tokens"}
    parts = [f"{p.clean!r} vs {p.corrupted!r} ({sources.get(p.source, p.source)})" for p in pairs]
    return "Suggested: " + "; ".join(parts) + ". A leading space is part of the token."


@callback(
    Output(CLEAN_ANSWER, "value"),
    Output(CORRUPTED_ANSWER, "value"),
    Output(ANSWER_HINT, "children"),
    Input(COMPARED, "data"),
)
def suggest_answers(data):
    """Fill the answer tokens with the best suggestion for the compared prompts."""
    if not data:
        return no_update, no_update, ""
    try:
        pairs = suggest_answer_tokens(data["prompt_a"], data["prompt_b"], data["model"])
    except ValueError as exc:
        return no_update, no_update, f"No suggestion: {exc}"
    if not pairs:
        return "", "", answer_hint(pairs)
    return pairs[0].clean, pairs[0].corrupted, answer_hint(pairs)


def patching_caption(result) -> str:
    """One line on what the sweeps measured (plain text)."""
    clean, corrupted = result.answer_str
    return (
        f"Metric: logit of {clean!r} minus logit of {corrupted!r} at the last position, on "
        f"{result.model_id}: {result.clean_metric:.3f} on A (clean, = 1) and "
        f"{result.corrupted_metric:.3f} on B (corrupted, = 0)."
    )


@callback(
    Output(PATCH_RESULTS, "children"),
    Output(PATCH_CAPTION, "children"),
    Output(PATCH_ALERT, "children"),
    Output(PATCH_ALERT, "is_open"),
    Input(PATCH_RUN, "n_clicks"),
    State(COMPARED, "data"),
    State(CLEAN_ANSWER, "value"),
    State(CORRUPTED_ANSWER, "value"),
    State(PATCH_KINDS_CHECK, "value"),
    State(LAYER, "value"),
    State(COLOR_MODE_SWITCH, "value"),
    background=True,
    progress=[
        Output(PATCH_PROGRESS, "value"),
        Output(PATCH_PROGRESS, "max"),
        Output(PATCH_PROGRESS, "label"),
    ],
    progress_default=[0, 1, ""],
    running=[
        (Output(PATCH_RUN, "disabled"), True, False),
        (Output(PATCH_CANCEL, "disabled"), False, True),
    ],
    cancel=[Input(PATCH_CANCEL, "n_clicks")],
    prevent_initial_call=True,
)
@limited_job(lambda message: (no_update, no_update, *alert_update(message)))
def run_patching(set_progress, n_clicks, data, clean_answer, corrupted_answer, kinds, layer, dark):
    """Patch A's activations into B for each chosen sweep; one heatmap per sweep."""

    def refuse(message: str):
        return no_update, no_update, *alert_update(message)

    # Check everything the user chose before the first forward pass.
    if not data:
        return refuse("Compare two prompts first: patching runs on the compared pair.")
    if data["n_pos_a"] != data["n_pos_b"]:
        return refuse(
            f"Patching needs prompts of equal length; A has {data['n_pos_a']} tokens and B "
            f"{data['n_pos_b']}. Edit one of them until the counts match."
        )
    kinds = [kind for kind in (kinds or []) if kind in PATCH_KINDS]
    if not kinds:
        return refuse("Choose at least one activation to patch.")
    if not clean_answer or not corrupted_answer:
        return refuse("Type the two answer tokens (each a single token, e.g. ' Paris').")
    layer = as_index(layer)
    if "head_out_by_pos" in kinds and (layer is None or layer >= data["n_layers"]):
        return refuse("Choose a layer for the per-position head sweep.")

    # One sweep after another; the bar shows the share of patched runs done in all of them.
    results = []
    for index, kind in enumerate(kinds):

        def report(done: int, total: int, index=index, kind=kind) -> None:
            share = (index + done / max(total, 1)) / len(kinds)
            set_progress((round(100 * share), 100, f"{kind}: {done}/{total}"))

        try:
            result = activation_patch(
                data["prompt_a"],
                data["prompt_b"],
                (clean_answer, corrupted_answer),
                kind,
                data["model"],
                layer=layer if kind == "head_out_by_pos" else None,
                progress=report,
            )
        except ValueError as exc:
            logger.info("patching refused: %s", exc)
            return refuse(str(exc))
        results.append(result)
    set_progress((100, 100, "done"))

    # A heatmap per sweep, positions labelled with both prompts' tokens where they differ.
    first = results[0]
    identity = [(pos, pos) for pos in range(len(first.clean_str_tokens))]
    pos_labels = pair_axis_labels(first.clean_str_tokens, first.corrupted_str_tokens, identity)
    graphs = []
    for result in results:
        title = KIND_TITLES[result.kind]
        values, axis_names = result.values, result.axis_names
        if result.kind == "head_out_by_pos":
            title = title.replace("the layer chosen above", f"layer {result.layer}")
            # Heads down and positions across, like the other per-position sweeps.
            values, axis_names = values.T, axis_names[::-1]
        figure = make_patching_heatmap(
            values, axis_names, pos_labels=pos_labels, title=title, dark=bool(dark)
        )
        graph_id = {"type": "compare-patch-figure", "kind": result.kind}
        graphs.append(
            dcc.Graph(
                figure=figure,
                id=graph_id,
                config={"displaylogo": False, "displayModeBar": "hover"},
            )
        )
        graphs.append(make_figure_download(graph_id))
    return graphs, patching_caption(first), *alert_update(None)


# --- Prompt sets -----------------------------------------------------------------------------


def prompt_set_tab() -> html.Div:
    """Paste or upload prompts, choose measures, run with progress; a table and a chart."""
    source = dbc.RadioItems(
        id=SET_SOURCE,
        options=[
            {"label": "pasted prompts", "value": "text"},
            {"label": "uploaded file", "value": "file"},
        ],
        value="text",
        inline=True,
        class_name="small",
    )
    upload = dcc.Upload(
        id=SET_UPLOAD,
        children=html.Div(
            ["Drop a .txt (one prompt per line) or .csv file here, or ", html.U("choose one")],
            className="small",
        ),
        className="border border-2 rounded p-3 text-center text-body-secondary",
        style={"borderStyle": "dashed"},
        multiple=False,
    )
    measures = html.Div(
        [
            dbc.Checklist(
                id=SET_MEASURES,
                options=[{"label": title, "value": m} for m, title in MEASURE_TITLES.items()],
                value=DEFAULT_MEASURES,
                inline=True,
                class_name="small",
            ),
            dbc.Input(
                id=SET_TOKEN,
                placeholder="token, e.g. cat",
                size="sm",
                style={"maxWidth": "12rem"},
            ),
        ],
        className="d-flex flex-wrap gap-2 align-items-center mt-2",
    )
    return html.Div(
        [
            make_error_alert(SET_ALERT),
            dbc.Row(
                [
                    dbc.Col(
                        dbc.Textarea(
                            id=SET_TEXT,
                            rows=5,
                            placeholder=SET_PLACEHOLDER,
                            class_name="font-monospace small",
                            spellcheck=False,
                        ),
                        lg=7,
                    ),
                    dbc.Col([upload, html.Div(id=SET_UPLOAD_STATUS, className="small mt-2")], lg=5),
                ],
                class_name="g-2",
            ),
            html.Div(
                [html.Span("Run on", className="small me-2"), source],
                className="d-flex align-items-center mt-2",
            ),
            measures,
            _run_buttons(SET_RUN, "Run prompt set", SET_CANCEL, SET_PROGRESS),
            dbc.Alert(id=SET_BAD_ROWS, color="warning", dismissable=True, is_open=False),
            dbc.InputGroup(
                [
                    dbc.InputGroupText("Chart"),
                    dbc.Select(id=SET_CHART_MEASURE, options=[], value=None),
                ],
                size="sm",
                class_name="mb-2",
                style={"maxWidth": "28rem"},
            ),
            dcc.Graph(
                id=SET_CHART,
                figure=make_empty_figure("Run a prompt set to chart it.", height=220),
                config={"displaylogo": False, "displayModeBar": False},
            ),
            make_figure_download(SET_CHART),
            make_measure_table(SET_TABLE),
        ]
    )


def decode_upload(contents: str | None, filename: str | None) -> bytes:
    """The bytes of a ``dcc.Upload`` data URL (``data:<type>;base64,<payload>``), refused past
    :data:`MAX_UPLOAD_BYTES` before decoding."""
    if not contents or not filename:
        raise ValueError("no file was uploaded: drop a .txt or .csv file on the upload area")
    if not isinstance(contents, str) or not isinstance(filename, str):
        raise ValueError("the upload did not arrive as one file: drop a single .txt or .csv file")
    size = len(contents) * 3 // 4  # base64 carries 3 bytes in 4 characters
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{filename} is {size / 1e6:.1f} MB; a prompt set file may hold at most "
            f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB ({DEFAULT_MAX_PROMPTS} prompts are read). Split it"
        )
    try:
        _, payload = contents.split(",", 1)
        return base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"{filename} did not arrive intact; upload it again") from None


def read_prompt_source(
    source: str, text: str | None, contents: str | None, filename: str | None
) -> PromptSet:
    """The prompts of the chosen source: the pasted text or the uploaded file."""
    if source == "file":
        return parse_prompt_file(filename, decode_upload(contents, filename))
    if not text or not text.strip():
        raise ValueError("paste some prompts (one per line) or upload a file first")
    return parse_prompt_text(text)


def upload_summary(parsed: PromptSet, filename: str) -> str:
    """One line on an uploaded file: prompts read, and the line numbers of skipped rows."""
    text = f"{filename}: {len(parsed.prompts)} prompts"
    if parsed.bad_rows:
        lines = ", ".join(str(bad.line) for bad in parsed.bad_rows[:10])
        more = "…" if len(parsed.bad_rows) > 10 else ""
        text += f"; {len(parsed.bad_rows)} rows will be skipped (line {lines}{more})"
    return text + "."


@callback(
    Output(SET_UPLOAD_STATUS, "children"),
    Output(SET_SOURCE, "value"),
    Input(SET_UPLOAD, "contents"),
    State(SET_UPLOAD, "filename"),
    prevent_initial_call=True,
)
def read_upload(contents, filename):
    """Check an uploaded file at once and switch the source to it."""
    try:
        parsed = parse_prompt_file(filename or "upload.txt", decode_upload(contents, filename))
    except ValueError as exc:
        return html.Span(str(exc), className="text-danger"), "text"
    return upload_summary(parsed, filename), "file"


def chosen_measures(measures: list | None, token: str | None, layer: object, head: object) -> list:
    """The measures to run: built-in names, and the head measure when it is checked."""
    chosen: list = [m for m in (measures or []) if m in BUILTIN_MEASURES]
    if "head_attention" in (measures or []):
        layer, head = as_index(layer), as_index(head)
        if layer is None or head is None:
            raise ValueError("choose a layer and a head above for the head-attention measure")
        if not token:
            raise ValueError("type the token the chosen head should attend to")
        chosen.append(HeadAttentionMeasure(layer, head, token))
    if not chosen:
        raise ValueError("choose at least one measure")
    return chosen


@callback(
    Output(SET_TABLE, "columns"),
    Output(SET_TABLE, "data"),
    Output(SET_TABLE, "tooltip_data"),
    Output(SET_CHART_MEASURE, "options"),
    Output(SET_CHART_MEASURE, "value"),
    Output(SET_BAD_ROWS, "children"),
    Output(SET_BAD_ROWS, "is_open"),
    Output(SET_ALERT, "children"),
    Output(SET_ALERT, "is_open"),
    Input(SET_RUN, "n_clicks"),
    State(SET_SOURCE, "value"),
    State(SET_TEXT, "value"),
    State(SET_UPLOAD, "contents"),
    State(SET_UPLOAD, "filename"),
    State(SET_MEASURES, "value"),
    State(SET_TOKEN, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
    State(MODEL, "value"),
    background=True,
    progress=[
        Output(SET_PROGRESS, "value"),
        Output(SET_PROGRESS, "max"),
        Output(SET_PROGRESS, "label"),
    ],
    progress_default=[0, 1, ""],
    running=[
        (Output(SET_RUN, "disabled"), True, False),
        (Output(SET_CANCEL, "disabled"), False, True),
    ],
    cancel=[Input(SET_CANCEL, "n_clicks")],
    prevent_initial_call=True,
)
@limited_job(lambda message: (*[no_update] * 7, *alert_update(message)))
def run_set(
    set_progress, n_clicks, source, text, contents, filename, measures, token, layer, head, model
):
    """Measure every prompt of the set (each cached); bad rows are listed and skipped."""
    try:
        parsed = read_prompt_source(source, text, contents, filename)
        chosen = chosen_measures(measures, token, layer, head)
        table = run_prompt_set(
            parsed,
            model,
            chosen,
            progress=lambda done, total: set_progress((done, total, f"{done}/{total}")),
        )
    except ValueError as exc:
        logger.info("prompt set refused: %s", exc)
        return *[no_update] * 7, *alert_update(str(exc))

    columns = [{"id": c.id, "name": c.name, "type": c.type} for c in table.columns]
    numeric = [c for c in columns if c["type"] == "numeric" and c["id"] not in ("line",)]
    options = [{"label": c["name"], "value": c["id"]} for c in numeric]
    chart = next((c["id"] for c in numeric if c["id"] != "n_tokens"), numeric[0]["id"])
    tooltips = [{"prompt": {"value": row["prompt"], "type": "text"}} for row in table.rows]
    bad = [{"line": b.line, "reason": b.reason} for b in table.bad_rows]
    return (
        table_columns(columns),
        table.rows,
        tooltips,
        options,
        chart,
        make_bad_rows_list(bad) if bad else "",
        bool(bad),
        *alert_update(None),
    )


@callback(
    Output(SET_CHART, "figure"),
    Input(SET_TABLE, "data"),
    Input(SET_CHART_MEASURE, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(SET_TABLE, "columns"),
)
def show_set_chart(rows, column, dark, columns):
    """A bar per prompt of the chosen measure."""
    names = {c["id"]: c["name"] for c in columns or []}
    if not rows or column not in names:
        return make_empty_figure("Run a prompt set to chart it.", dark=bool(dark), height=220)
    return make_measure_chart(rows, column, names[column], dark=bool(dark))
