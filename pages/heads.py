"""Heads: what every attention head of a model does, scored on a standard battery.

Scores come from :func:`analysis.heads.model_head_scores` (computed once per model weights and
cached) or, for the last prompt analysed in this tab, from :func:`analysis.heads.prompt_head_scores`
(read from that analysis's cache). A layer x head heatmap shows one score, a sortable table shows
them all, and a click on either opens the head on the Attention page.
"""

# No ``from __future__ import annotations``: Dash runs page modules before listing them in
# sys.modules, and dataclasses with string annotations look their module up there.
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
import numpy as np
from dash import (
    Input,
    Output,
    State,
    callback,
    ctx,
    dcc,
    get_relative_path,
    html,
    no_update,
    register_page,
)

import analysis
from analysis.bundle import collect_report
from analysis.heads import (
    BATTERY_N_SEQS,
    BATTERY_SEG_LEN,
    model_head_scores,
    prompt_head_scores,
)
from analysis.settings import get_settings
from components.alerts import alert_update, make_error_alert
from components.download import (
    ReportDownloadIds,
    make_figure_download,
    make_report_download,
    register_report_download,
)
from components.heatmaps import make_empty_figure, parse_panel_click
from components.prompt_panel import DEFAULT_PROMPT, model_options
from components.retention import head_table_rows, make_head_score_heatmap, make_head_table
from components.shell import COLOR_MODE_SWITCH, LAST_ANALYSIS_STORE
from components.url_state import QueryReader

register_page(
    __name__,
    path="/heads",
    name="Heads",
    title="MemLens · Heads",
    description="What every attention head does: previous-token, induction and more.",
    order=2,
)
logger = logging.getLogger(__name__)

# Component ids, declared once.
ALERT = "heads-alert"
URL = "heads-url"
NAV = "heads-nav"
MODEL = "heads-model"
SCORE = "heads-score"
SOURCE = "heads-source"
HEATMAP = "heads-heatmap"
CAPTION = "heads-caption"
SUMMARY = "heads-summary"
TABLE = "heads-table"
REPORT = ReportDownloadIds("heads")

# Score name -> (title, caption saying how to read it, colour range or None to fit the data).
SCORES = {
    "induction": (
        "Induction",
        "Attention from each token to the token after an earlier copy of itself (Olsson et al. "
        "2022): the head that completes a repeated phrase. 1 = a perfect induction head.",
        (0.0, 1.0),
    ),
    "previous_token": (
        "Previous token",
        "Attention to the immediately preceding token. 1 = the head always looks one back.",
        (0.0, 1.0),
    ),
    "duplicate_token": (
        "Duplicate token",
        "Attention to earlier copies of the query's own token. 1 = always finds the copy.",
        (0.0, 1.0),
    ),
    "entropy": (
        "Attention entropy (nats)",
        "Mean entropy of the attention rows: 0 = each query looks at one token, high = "
        "attention spread over many.",
        None,
    ),
    "mean_distance": (
        "Mean attention distance",
        "Attention-weighted mean of (query − key) in positions: how far back the head looks.",
        None,
    ),
}
DEFAULT_SCORE = "induction"
# A head scoring this much attends where the behaviour predicts most of the time.
STRONG_HEAD_SCORE = 0.5
# Repeated-half loss below this share of the first half's means in-context copying.
COPYING_LOSS_RATIO = 0.5
SOURCES = {
    "battery": f"Standard battery ({BATTERY_N_SEQS} × {BATTERY_SEG_LEN} random tokens, repeated)",
    "prompt": "Last prompt analysed in this tab",
}
DEFAULT_SOURCE = "battery"


# --- URL state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewState:
    """What a link asks the page to show."""

    model: str
    score: str = DEFAULT_SCORE
    source: str = DEFAULT_SOURCE


def parse_view_query(query: dict, *, default_model: str) -> tuple[ViewState, list[str]]:
    """The view URL query parameters ask for, and a message for each unusable one.

    Args:
        query: Parameters as Dash pages passes them to ``layout``: a string per key, or a list
            when the key repeats.
        default_model: Model to use when the link names none.

    Returns:
        ``(state, messages)``; unusable values fall back to the defaults.
    """
    read = QueryReader(query)
    state = ViewState(
        model=read.text("model") or default_model,
        score=read.choice("score", SCORES, DEFAULT_SCORE, problem=_unknown(DEFAULT_SCORE)),
        source=read.choice("source", SOURCES, DEFAULT_SOURCE, problem=_unknown(DEFAULT_SOURCE)),
    )
    return state, read.messages


def _unknown(default: str) -> str:
    """What a link's message says about a score or source the page does not know."""
    return f"is unknown; showing {default}"


def attention_link(model: str, layer: int, head: int, prompt: str | None = None) -> str:
    """The Attention page's URL showing ``head`` of ``layer`` on ``prompt`` (the example with a
    repeated phrase by default, where induction and previous-token heads show)."""
    params = {"model": model, "prompt": prompt or DEFAULT_PROMPT, "layer": layer, "head": head}
    return get_relative_path("/") + "?" + urlencode(params)


# --- Layout ----------------------------------------------------------------------------------


def layout(**query) -> html.Div:
    """The page for a URL's query parameters; works with none."""
    state, messages = parse_view_query(query, default_model=get_settings().default_model)
    controls = html.Div(
        [
            dbc.InputGroup(
                [
                    dbc.InputGroupText("Model"),
                    dbc.Select(
                        id=MODEL,
                        options=model_options(analysis.available_models(), state.model),
                        value=state.model,
                    ),
                ],
                size="sm",
                class_name="w-auto",
            ),
            dbc.InputGroup(
                [
                    dbc.InputGroupText("Score"),
                    dbc.Select(
                        id=SCORE,
                        options=[{"label": t, "value": n} for n, (t, _, _) in SCORES.items()],
                        value=state.score,
                    ),
                ],
                size="sm",
                class_name="w-auto",
            ),
            dbc.RadioItems(
                id=SOURCE,
                options=[{"label": text, "value": name} for name, text in SOURCES.items()],
                value=state.source,
                inline=True,
                class_name="small",
            ),
            html.Div(make_report_download(REPORT), className="ms-auto"),
        ],
        className="d-flex flex-wrap gap-3 align-items-center",
    )
    heatmap = dbc.Card(
        dbc.CardBody(
            [
                html.Div(id=CAPTION, className="small text-body-secondary mb-1"),
                dcc.Loading(
                    dcc.Graph(
                        id=HEATMAP,
                        figure=make_empty_figure("Computing head scores…", height=260),
                        config={"displaylogo": False, "displayModeBar": "hover"},
                    ),
                    delay_show=400,
                    type="circle",
                ),
                make_figure_download(HEATMAP),
            ]
        ),
        class_name="mb-3",
    )
    table = dbc.Card(
        dbc.CardBody(
            [
                html.Div(id=SUMMARY, className="small mb-2"),
                html.Div(
                    "Every head and score; click a column title to sort, a row to open the head.",
                    className="small text-body-secondary mb-1",
                ),
                make_head_table(TABLE, {name: title for name, (title, _, _) in SCORES.items()}),
            ]
        ),
        class_name="mb-3",
    )
    return html.Div(
        [
            dcc.Location(id=URL, refresh=False),
            dcc.Location(id=NAV, refresh="callback-nav"),
            make_error_alert(ALERT, " ".join(messages) or None),
            dbc.Card(
                dbc.CardBody(
                    [
                        controls,
                        html.Div(
                            "What each attention head does, scored once per model on random "
                            "tokens repeated twice (TransformerLens's head-detector battery), or "
                            "on your last prompt. Click a head to open it on the Attention page.",
                            className="small text-body-secondary mt-2",
                        ),
                    ]
                ),
                class_name="mb-3",
            ),
            dbc.Row([dbc.Col(heatmap, xl=6), dbc.Col(table, xl=6)]),
        ]
    )


# --- Callbacks -------------------------------------------------------------------------------


def head_scores(model: str, source: str, last: dict | None):
    """The :class:`~analysis.heads.HeadScores` to show; ValueError with a message for the user."""
    if source == "prompt":
        if not isinstance(last, dict) or not last.get("prompt"):
            raise ValueError(
                "no prompt analysed in this tab yet: analyse one on the Attention or Retention "
                "page, or choose the standard battery"
            )
        return prompt_head_scores(analysis.analyze(last["prompt"], model))
    return model_head_scores(model)


def summary_lines(scores, source: str) -> list:
    """The strongest previous-token and induction heads, and the battery's loss ratio."""
    lines = []
    for name, kind in (("previous_token", "previous-token"), ("induction", "induction")):
        try:
            layer, head, value = scores.best(name)
        except ValueError:
            lines.append(html.Div(f"No head has a {kind} score on this input (no repeats)."))
            continue
        strength = "strong" if value >= STRONG_HEAD_SCORE else "weak"
        lines.append(
            html.Div(
                [
                    f"Strongest {kind} head: ",
                    html.B(f"L{layer} H{head}"),
                    f" ({value:.2f}, {strength})",
                ]
            )
        )
    ratio = scores.loss_ratio if source == "battery" else None
    if ratio is not None:
        verdict = (
            "the model predicts the repeat from memory"
            if ratio <= COPYING_LOSS_RATIO
            else "little sign that it predicts the repeat from memory"
        )
        lines.append(
            html.Div(
                f"Loss on the repeated half is {ratio:.2f} × the loss on the first half: {verdict}."
            )
        )
    return lines


@callback(
    Output(HEATMAP, "figure"),
    Output(CAPTION, "children"),
    Output(SUMMARY, "children"),
    Output(TABLE, "data"),
    Output(ALERT, "children"),
    Output(ALERT, "is_open"),
    Input(MODEL, "value"),
    Input(SCORE, "value"),
    Input(SOURCE, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(LAST_ANALYSIS_STORE, "data"),
)
def show_scores(model, score, source, dark, last):
    """The chosen score as a layer x head heatmap, its strongest head framed; every score in the
    table."""
    score = score if score in SCORES else DEFAULT_SCORE
    source = source if source in SOURCES else DEFAULT_SOURCE
    try:
        scores = head_scores(model, source, last)
    except ValueError as exc:
        logger.info("head scores refused: %s", exc)
        empty = make_empty_figure("No head scores to show.", dark=bool(dark), height=260)
        return empty, "", [], [], *alert_update(str(exc))

    title, caption, zrange = SCORES[score]
    values = getattr(scores, score)
    best = None if np.isnan(values).all() else scores.best(score)[:2]
    where = "the standard battery" if source == "battery" else "your last prompt"
    figure = make_head_score_heatmap(
        values,
        title=f"{title} score of every head on {where}",
        value_name=title,
        zrange=zrange,
        selected=best,
        dark=bool(dark),
    )
    caption = f"{caption} The strongest head is framed; click a head to open it."
    rows = head_table_rows(scores.as_dict())
    return figure, caption, summary_lines(scores, source), rows, *alert_update(None)


def report_inputs(model: str | None, last: dict | None):
    """The report bundle of this tab's last prompt (the example if none) on the chosen model."""
    if not model:
        raise ValueError("choose a model first")
    last = last if isinstance(last, dict) and last.get("prompt") else {}
    prompt = last.get("prompt") or DEFAULT_PROMPT
    return collect_report(analysis.analyze(prompt, model, truncate=bool(last.get("truncate"))))


register_report_download(
    REPORT, [State(MODEL, "value"), State(LAST_ANALYSIS_STORE, "data")], report_inputs
)


def head_from_table(active_cell: object) -> tuple[int, int] | None:
    """``(layer, head)`` of a clicked table row (its ``id`` is ``L<layer>H<head>``)."""
    try:
        row_id = str(active_cell["row_id"])  # type: ignore[index]
        layer, head = row_id.removeprefix("L").split("H")
        return int(layer), int(head)
    except (TypeError, KeyError, ValueError):
        return None


@callback(
    Output(NAV, "href"),
    Input(HEATMAP, "clickData"),
    Input(TABLE, "active_cell"),
    State(MODEL, "value"),
    State(SOURCE, "value"),
    State(LAST_ANALYSIS_STORE, "data"),
    prevent_initial_call=True,
)
def open_head(heatmap_click, active_cell, model, source, last):
    """A click on a heatmap cell or a table row opens that head on the Attention page."""
    if ctx.triggered_id == HEATMAP:
        picked = parse_panel_click(heatmap_click)
    else:
        picked = head_from_table(active_cell)
    if picked is None or not model:
        return no_update
    prompt = last.get("prompt") if source == "prompt" and isinstance(last, dict) else None
    return attention_link(model, *picked, prompt)


@callback(
    Output(URL, "search"),
    Input(MODEL, "value"),
    Input(SCORE, "value"),
    Input(SOURCE, "value"),
    prevent_initial_call=True,
)
def sync_url(model, score, source):
    """Keep the address bar on a link that reopens this view."""
    if not model:
        return no_update
    return "?" + urlencode({"model": model, "score": score, "source": source})
