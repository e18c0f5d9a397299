"""Retention: how much of each input token survives, and where it goes, layer by layer.

The Analyse button runs ``analysis.analyze`` (one forward pass, or a cache hit). Every view then
reads the cached analysis and the arrays :mod:`analysis.retention` caches next to it (logit lens,
rollout, direct-logit-attribution components): choosing a token, a layer or a metric never runs
the model again. The memory horizon needs one forward pass per context window, so it runs as a
background job with a progress bar and a Cancel button; its result is cached too, and the view
only ever reads that cache.
"""

# No ``from __future__ import annotations``: Dash runs page modules before listing them in
# sys.modules, and dataclasses with string annotations look their module up there.
import logging
from dataclasses import dataclass, field
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
import numpy as np
from dash import (
    ALL,
    Input,
    Output,
    State,
    callback,
    clientside_callback,
    ctx,
    dcc,
    html,
    no_update,
    register_page,
)

import analysis
from analysis import retention
from analysis.bundle import collect_report
from analysis.horizon import memory_horizon
from analysis.models import usable_model
from analysis.settings import get_settings
from components.alerts import alert_update, make_error_alert
from components.download import (
    ReportDownloadIds,
    make_figure_download,
    make_report_download,
    register_report_download,
)
from components.heatmaps import make_empty_figure
from components.jobs import limited_job
from components.prompt_panel import (
    DEFAULT_PROMPT,
    PromptPanelIds,
    make_prompt_panel,
    register_example_callback,
)
from components.recent_menu import remember_view
from components.retention import (
    log_rank,
    make_attribution_figure,
    make_composition_heatmap,
    make_horizon_curve,
    make_horizon_heatmap,
    make_kl_chart,
    make_reach_bars,
    make_retention_curves,
    make_stage_heatmap,
    make_top_tokens_table,
    quoted,
    rank_ticks,
    stage_labels,
)
from components.shell import COLOR_MODE_SWITCH, LAST_ANALYSIS_STORE, make_card
from components.tokens import SELECTED_TOKEN_CLASS, TOKEN_CLASS, display_token, make_token_strip
from components.url_state import QueryReader, as_index, short

register_page(
    __name__,
    path="/retention",
    name="Retention",
    title="MemLens · Retention",
    description="How much of each token survives, and where it goes, layer by layer.",
    order=1,
)
logger = logging.getLogger(__name__)

# Component ids, declared once.
PAGE = "retention"
PANEL = PromptPanelIds(PAGE)
REPORT = ReportDownloadIds(PAGE)
ALERT = "retention-alert"
URL = "retention-url"
ANALYSIS = "retention-analysis"
REQUEST = "retention-request"
POSITION = "retention-position"
TOKEN_CHIP = "retention-token-chip"
STRIP = "retention-token-strip"
SOURCE = "retention-source"
STAGE = "retention-stage"
COMPOSITION = "retention-composition"
COMPOSITION_CAPTION = "retention-composition-caption"
REACH = "retention-reach"
REACH_CAPTION = "retention-reach-caption"
METRIC = "retention-metric"
RESID = "retention-resid"
RESID_CAPTION = "retention-resid-caption"
LENS = "retention-lens"
KL = "retention-kl"
LENS_CAPTION = "retention-lens-caption"
CURVE_TOKENS = "retention-curve-tokens"
CURVES = "retention-curves"
TARGET = "retention-target"
DLA = "retention-dla"
DLA_CAPTION = "retention-dla-caption"
HORIZON_RUN = "retention-horizon-run"
HORIZON_CANCEL = "retention-horizon-cancel"
HORIZON_PROGRESS = "retention-horizon-progress"
HORIZON_ALERT = "retention-horizon-alert"
HORIZON_DONE = "retention-horizon-done"
HORIZON = "retention-horizon"
HORIZON_CURVE = "retention-horizon-curve"
HORIZON_CAPTION = "retention-horizon-caption"

SPINNER_DELAY_MS = 400
# Dash 4 injects its own :root colours after assets/, so the dropdown follows Bootstrap's colour
# mode only when they are set on the element itself (its open menu is a portal and keeps them).
DROPDOWN_COLORS = {
    "--Dash-Fill-Inverse-Strong": "var(--bs-body-bg)",
    "--Dash-Text-Strong": "var(--bs-body-color)",
    "--Dash-Text-Primary": "var(--bs-body-color)",
    "--Dash-Text-Weak": "var(--bs-secondary-color)",
    "--Dash-Stroke-Strong": "var(--bs-border-color)",
    "--Dash-Fill-Interactive-Weak": "var(--bs-tertiary-bg)",
}
MAX_CURVES = 8
# Within this many nats of the full-context loss counts as "the context no longer helps".
HORIZON_TOLERANCE = 0.1

# Metric name -> (selector label, caption saying how to read the heatmap).
METRICS = {
    "cosine": (
        "Cosine to own embedding",
        "Cosine between the stream at each position and that token's embedding row W_E[token] "
        "(positional part left out): near 1 the token's identity is intact, near 0 it has been "
        "overwritten.",
    ),
    "norm": (
        "Norm",
        "L2 norm of the residual stream at each position as it enters each layer; it usually "
        "grows with depth.",
    ),
    "token_rank": (
        "Rank of the token itself",
        "Logit lens (each layer's stream decoded with the final LayerNorm and unembedding): the "
        "rank of the position's own token, 0 = top guess; bright cells still 'see' the token.",
    ),
    "token_prob": (
        "Probability of the token itself",
        "Logit lens: the probability each layer's decoded stream gives the position's own token.",
    ),
    "next_rank": (
        "Rank of the next token",
        "Logit lens: the rank of the token that actually comes next, 0 = top guess; where a "
        "column turns bright is the layer where the prediction forms.",
    ),
    "next_prob": (
        "Probability of the next token",
        "Logit lens: the probability of the token that actually comes next; where a column "
        "brightens is where the prediction forms.",
    ),
    "kl": (
        "KL from the final prediction",
        "Logit lens: KL(final ‖ layer) in nats at each position; 0 (dark) means that layer "
        "already predicts what the model finally predicts.",
    ),
}
DEFAULT_METRIC = "cosine"
TARGET_PREDICTED = "predicted"
TARGET_ACTUAL = "actual"
TARGET_LABELS = {TARGET_PREDICTED: "predicted token", TARGET_ACTUAL: "actual next token"}


# --- URL state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewState:
    """What a link asks the page to show (indices are checked against the prompt later)."""

    model: str
    prompt: str
    pos: int | None = None
    source: int | None = None
    stage: int | None = None
    tokens: list[int] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    target: str = TARGET_PREDICTED
    from_url: bool = False


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
    messages = read.messages

    tokens: list[int] = []
    raw_tokens = read.text("tokens")
    if raw_tokens is not None:
        parts = [as_index(part) for part in raw_tokens.split(",")]
        tokens = list(dict.fromkeys(p for p in parts if p is not None))[:MAX_CURVES]
        if None in parts:
            messages.append(
                f"tokens {short(raw_tokens)} in the link has entries that are not "
                "positions; they were left out"
            )
    metric = read.text("metric") or DEFAULT_METRIC
    if metric not in METRICS:
        messages.append(f"metric {short(metric)} is unknown; showing {DEFAULT_METRIC}")
        metric = DEFAULT_METRIC
    target = read.text("target") or TARGET_PREDICTED
    if target not in (TARGET_PREDICTED, TARGET_ACTUAL) and _target_token(target) is None:
        messages.append(f"target {short(target)} is not 'predicted', 'actual' or 'token:<id>'")
        target = TARGET_PREDICTED
    prompt = read.text("prompt")
    state = ViewState(
        model=read.text("model") or default_model,
        prompt=prompt or DEFAULT_PROMPT,
        pos=read.index("pos", fallback="ignored"),
        source=read.index("source", fallback="ignored"),
        stage=read.index("stage", fallback="ignored"),
        tokens=tokens,
        metric=metric,
        target=target,
        from_url=prompt is not None,
    )
    return state, messages


def view_search(data, pos, source, stage, tokens, metric, target) -> str:
    """The query string that reopens this view."""
    if not data:
        return ""
    params = {"model": data["model"], "prompt": data["prompt"], "metric": metric or DEFAULT_METRIC}
    for name, value in (("pos", pos), ("source", source), ("stage", stage)):
        if as_index(value) is not None:
            params[name] = as_index(value)
    chosen = [str(p) for p in (as_index(t) for t in tokens or []) if p is not None]
    if chosen:
        params["tokens"] = ",".join(chosen)
    if target:
        params["target"] = target
    return "?" + urlencode(params)


def _target_token(target: object) -> int | None:
    """The token id of a ``token:<id>`` target, None for anything else."""
    if isinstance(target, str) and target.startswith("token:"):
        return as_index(target.removeprefix("token:"))
    return None


# --- Reading the cached analysis -------------------------------------------------------------


def open_analysis(data: dict) -> analysis.PromptAnalysis:
    """The cached analysis a store entry names (a cache hit; recomputed if it was evicted).

    Raises ValueError when the model's weights were replaced since the page analysed the prompt
    (the positions and layers the browser holds may no longer exist).
    """
    pa = analysis.analyze(data["prompt"], data["model"])
    if (pa.n_layers, pa.n_pos) != (data["n_layers"], data["n_pos"]):
        raise ValueError(
            f"the weights of {data['model']} changed since this prompt was analysed; press "
            "Analyse to see the new model"
        )
    return pa


def _position(data: dict | None, value: object) -> int | None:
    """``value`` as a position of the analysed prompt, None when it is not one."""
    pos = as_index(value)
    if not data or pos is None or pos >= data["n_pos"]:
        return None
    return pos


def default_curve_tokens(n_pos: int) -> list[int]:
    """Up to three positions to follow at first: the first after BOS, the middle, the last."""
    return sorted({min(1, n_pos - 1), n_pos // 2, n_pos - 1})


def _token_options(str_tokens: list[str]) -> list[dict]:
    return [
        {"label": f"{pos} {display_token(token)}", "value": pos}
        for pos, token in enumerate(str_tokens)
    ]


# --- Layout ----------------------------------------------------------------------------------


def _graph(graph_id: str, message: str = "Analyse a prompt to see this view.") -> html.Div:
    config = {"displaylogo": False, "displayModeBar": "hover"}
    graph = dcc.Loading(
        dcc.Graph(id=graph_id, figure=make_empty_figure(message, height=240), config=config),
        delay_show=SPINNER_DELAY_MS,
        type="circle",
    )
    return html.Div([graph, make_figure_download(graph_id)])


def _caption(caption_id: str, text: str = "") -> html.Div:
    return html.Div(text, id=caption_id, className="small text-body-secondary mb-1")


def _picker(picker_id: str, label: str, value, options=None, width: str = "9rem"):
    return dbc.InputGroup(
        [
            dbc.InputGroupText(label),
            dbc.Select(id=picker_id, options=options or [], value=value, style={"minWidth": width}),
        ],
        size="sm",
        class_name="w-auto",
    )


def layout(**query) -> html.Div:
    """The page for a URL's query parameters; works with none."""
    state, messages = parse_view_query(query, default_model=get_settings().default_model)
    prompt_panel = make_prompt_panel(
        PANEL,
        models=analysis.available_models(),
        model=state.model,
        prompt=state.prompt,
        actions=make_report_download(REPORT),
    )
    tokens = make_card(
        "Tokens",
        dcc.Loading(html.Div(id=STRIP), delay_show=SPINNER_DELAY_MS),
        extra=html.Small(
            "Click a token to inspect it below; it is also added to the retention curves.",
            className="text-body-secondary",
        ),
        class_name="h-100",
    )
    reach = make_card(
        "Memory reach · attention rollout",
        [
            html.P(
                "Attention rollout (Abnar & Zuidema 2020) follows every input token through the "
                "layers: heads are averaged, the residual connection counts as attention to "
                "oneself, and layers are multiplied through.",
                className="small mb-2",
            ),
            dbc.Row(
                [
                    dbc.Col([_caption(COMPOSITION_CAPTION), _graph(COMPOSITION)], lg=6),
                    dbc.Col([_caption(REACH_CAPTION), _graph(REACH)], lg=6),
                ]
            ),
        ],
        extra=html.Div(
            [
                _picker(SOURCE, "Source token", None, width="12rem"),
                _picker(STAGE, "Reach after", None),
            ],
            className="d-flex flex-wrap gap-2",
        ),
        class_name="border-primary",
    )
    metric_options = [{"label": label, "value": name} for name, (label, _) in METRICS.items()]
    resid = make_card(
        "Residual stream",
        [_caption(RESID_CAPTION), _graph(RESID)],
        extra=_picker(METRIC, "Metric", state.metric, metric_options, width="16rem"),
    )
    lens = make_card("Logit lens", [_caption(LENS_CAPTION), _graph(LENS), _graph(KL)])
    curves = make_card(
        "Retention curves",
        [
            dcc.Dropdown(
                id=CURVE_TOKENS,
                options=[],
                value=state.tokens,
                multi=True,
                placeholder="Choose tokens to follow (or click them above)",
                className="mb-2",
                style=DROPDOWN_COLORS,
            ),
            html.Div(
                "Each line follows one token through the layers: the cosine of its stream to its "
                "own embedding, the logit-lens rank of the token itself (0 = top guess, up is "
                "better) and its rollout share of its own stream.",
                className="small text-body-secondary mb-1",
            ),
            _graph(CURVES),
        ],
    )
    dla = make_card(
        "Direct logit attribution",
        [_caption(DLA_CAPTION), _graph(DLA)],
        extra=_picker(
            TARGET,
            "Target",
            state.target,
            [{"label": TARGET_LABELS.get(state.target, state.target), "value": state.target}],
            width="14rem",
        ),
    )
    horizon = make_card(
        "Memory horizon",
        [
            html.Div(
                [
                    dbc.Button("Run", id=HORIZON_RUN, color="primary", size="sm", n_clicks=0),
                    dbc.Button(
                        "Cancel",
                        id=HORIZON_CANCEL,
                        color="secondary",
                        outline=True,
                        size="sm",
                        disabled=True,
                    ),
                    dbc.Progress(
                        id=HORIZON_PROGRESS,
                        value=0,
                        max=1,
                        striped=True,
                        class_name="flex-grow-1",
                    ),
                ],
                className="d-flex gap-2 align-items-center mb-2",
            ),
            make_error_alert(HORIZON_ALERT),
            _caption(HORIZON_CAPTION),
            dbc.Row(
                [
                    dbc.Col(_graph(HORIZON, "Press Run to measure the memory horizon."), xl=8),
                    dbc.Col(_graph(HORIZON_CURVE, "The average curve appears here."), xl=4),
                ]
            ),
        ],
        extra=html.Small(
            "One forward pass per context window: a background job.",
            className="text-body-secondary",
        ),
    )
    request = {
        "from_url": state.from_url,
        "pos": state.pos,
        "source": state.source,
        "stage": state.stage,
        "tokens": state.tokens,
        "messages": messages,
    }

    return html.Div(
        [
            dcc.Location(id=URL, refresh=False),
            dcc.Store(id=ANALYSIS),
            dcc.Store(id=REQUEST, data=request),
            dcc.Store(id=POSITION, data=state.pos),
            dcc.Store(id=HORIZON_DONE),
            make_error_alert(ALERT, " ".join(messages) or None),
            dbc.Row(
                [
                    dbc.Col(prompt_panel, lg=5, class_name="mb-3"),
                    dbc.Col(tokens, lg=7, class_name="mb-3"),
                ]
            ),
            reach,
            resid,
            dbc.Row([dbc.Col(lens, xl=5), dbc.Col(dla, xl=7)]),
            curves,
            horizon,
        ]
    )


# --- Analysis and selection ------------------------------------------------------------------

register_example_callback(PANEL)


def _checked(value: int | None, count: int, name: str, default: int, messages: list[str]) -> int:
    """``value`` when it is below ``count``, else ``default`` (with a message if one was asked)."""
    if value is None:
        return default
    if value >= count:
        messages.append(f"{name} {value} does not exist (0–{count - 1}); showing {default}")
        return default
    return value


@callback(
    Output(ANALYSIS, "data"),
    Output(STRIP, "children"),
    Output(POSITION, "data"),
    Output(SOURCE, "options"),
    Output(SOURCE, "value"),
    Output(STAGE, "options"),
    Output(STAGE, "value"),
    Output(CURVE_TOKENS, "options"),
    Output(CURVE_TOKENS, "value"),
    Output(ALERT, "children"),
    Output(ALERT, "is_open"),
    Output(PANEL.prompt, "value"),
    Output(PANEL.model, "value"),
    Output(LAST_ANALYSIS_STORE, "data"),
    Input(PANEL.analyse, "n_clicks"),
    State(PANEL.prompt, "value"),
    State(PANEL.model, "value"),
    State(REQUEST, "data"),
    State(LAST_ANALYSIS_STORE, "data"),
)
def analyse(n_clicks, prompt, model, request, last):
    """Analyse the prompt (a cache hit when seen before) and reset the token choices.

    On page load it opens what the link asks for, else this tab's last analysis, else the
    example in the prompt box.
    """
    first_load = not n_clicks
    request = (request or {}) if first_load else {}
    messages = list(request.get("messages", []))
    if first_load and not request.get("from_url") and isinstance(last, dict):
        prompt, model = last.get("prompt", prompt), last.get("model", model)
    if first_load:
        model = usable_model(model, get_settings().default_model, messages)

    try:
        pa = analysis.analyze(prompt, model)
    except ValueError as exc:
        logger.info("analysis refused: %s", exc)
        messages.append(str(exc))
        return (*[no_update] * 9, *alert_update(" ".join(messages)), prompt, model, no_update)

    # Indices from the link, checked against this prompt; defaults otherwise.
    n_pos, n_layers = pa.n_pos, pa.n_layers
    pos = _checked(as_index(request.get("pos")), n_pos, "position", n_pos - 1, messages)
    source = _checked(as_index(request.get("source")), n_pos, "source", min(1, n_pos - 1), messages)
    stage = _checked(as_index(request.get("stage")), n_layers + 1, "stage", n_layers, messages)
    asked = [p for p in (as_index(t) for t in request.get("tokens") or []) if p is not None]
    tokens = [p for p in asked if p < n_pos] or default_curve_tokens(n_pos)
    if len(tokens) < len(asked):
        messages.append(f"some curve tokens do not exist (the prompt has {n_pos} tokens)")

    data = {
        "model": model,
        "prompt": prompt,
        "n_layers": n_layers,
        "n_heads": pa.n_heads,
        "n_pos": n_pos,
    }
    if not first_load or request.get("from_url"):  # asked for, not a reopened example
        search = view_search(data, pos, source, stage, tokens, None, None)
        remember_view("/retention", search, model, prompt)
    token_options = _token_options(pa.str_tokens)
    stages = stage_labels(n_layers)
    return (
        data,
        make_token_strip(pa.str_tokens, token_type=TOKEN_CHIP, selected=pos),
        pos,
        [{**option, "value": str(option["value"])} for option in token_options],
        str(source),
        [{"label": stages[s], "value": str(s)} for s in range(1, n_layers + 1)],
        str(stage),
        token_options,
        tokens,
        *alert_update(" ".join(messages) or None),
        prompt,
        model,
        {"model": model, "prompt": prompt},
    )


def report_inputs(data: dict | None):
    """What the report bundle shows: every layer's heads, the loss, norms and logit-lens ranks."""
    if not data:
        raise ValueError("analyse a prompt first; the report shows its analysis")
    return collect_report(open_analysis(data))


register_report_download(REPORT, [State(ANALYSIS, "data")], report_inputs)


def position_from_click(click_data: object) -> int | None:
    """The position of a click on a token-labelled axis (``x`` labels ``"12 ·cat"``)."""
    try:
        label = click_data["points"][0]["x"]  # type: ignore[index]
        return int(str(label).split(" ", 1)[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


@callback(
    Output(POSITION, "data", allow_duplicate=True),
    Output(CURVE_TOKENS, "value", allow_duplicate=True),
    Input({"type": TOKEN_CHIP, "index": ALL}, "n_clicks"),
    Input(RESID, "clickData"),
    Input(REACH, "clickData"),
    State(CURVE_TOKENS, "value"),
    State(ANALYSIS, "data"),
    prevent_initial_call=True,
)
def choose_position(_chip_clicks, resid_click, reach_click, curve_tokens, data):
    """A click on a token chip, a residual-stream column or a reach bar chooses that token; a
    chip also adds it to the retention curves."""
    curve_tokens = list(curve_tokens or [])
    if ctx.triggered_id in (RESID, REACH):
        click = resid_click if ctx.triggered_id == RESID else reach_click
        pos = _position(data, position_from_click(click))
        return (no_update if pos is None else pos), no_update
    if not isinstance(ctx.triggered_id, dict) or not ctx.triggered[0].get("value"):
        return no_update, no_update  # a freshly drawn strip, not a click
    pos = _position(data, ctx.triggered_id["index"])
    if pos is None:
        return no_update, no_update
    if pos not in curve_tokens:
        curve_tokens = [*curve_tokens, pos][-MAX_CURVES:]
    return pos, curve_tokens


@callback(
    Output(SOURCE, "value", allow_duplicate=True),
    Input(COMPOSITION, "clickData"),
    State(ANALYSIS, "data"),
    prevent_initial_call=True,
)
def choose_source(click_data, data):
    """Clicking a source column of the rollout heatmap follows that token's reach."""
    pos = _position(data, position_from_click(click_data))
    return no_update if pos is None else str(pos)


clientside_callback(
    f"""
    function(selected, ids) {{
        return ids.map(id => id.index === selected ? '{SELECTED_TOKEN_CLASS}' : '{TOKEN_CLASS}');
    }}
    """,
    Output({"type": TOKEN_CHIP, "index": ALL}, "className"),
    Input(POSITION, "data"),
    State({"type": TOKEN_CHIP, "index": ALL}, "id"),
)


@callback(
    Output(URL, "search"),
    Input(ANALYSIS, "data"),
    Input(POSITION, "data"),
    Input(SOURCE, "value"),
    Input(STAGE, "value"),
    Input(CURVE_TOKENS, "value"),
    Input(METRIC, "value"),
    Input(TARGET, "value"),
    prevent_initial_call=True,
)
def sync_url(data, pos, source, stage, tokens, metric, target):
    """Keep the address bar on a link that reopens this view."""
    return view_search(data, pos, source, stage, tokens, metric, target) or no_update


# --- Views -----------------------------------------------------------------------------------

NO_ANALYSIS = "Analyse a prompt to see this view."
ALERT_OUTPUTS = (
    Output(ALERT, "children", allow_duplicate=True),
    Output(ALERT, "is_open", allow_duplicate=True),
)


def _empty(message: str, dark, height: int = 240):
    return make_empty_figure(message, dark=bool(dark), height=height)


def _guarded(build, n_figures: int, n_texts: int, dark) -> tuple:
    """``build()``'s figures and texts with the alert left alone; when ``build`` raises
    ValueError, blank figures and the message in the page's alert (the server keeps serving)."""
    try:
        return (*build(), no_update, no_update)
    except ValueError as exc:
        logger.info("view refused: %s", exc)
        blank = [_empty("Nothing to show here: see the message at the top.", dark)] * n_figures
        return (*blank, *[""] * n_texts, *alert_update(str(exc)))


@callback(
    Output(COMPOSITION, "figure"),
    Output(COMPOSITION_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(POSITION, "data"),
    Input(SOURCE, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_composition(data, pos, source, dark):
    """What the chosen token's stream is made of after every layer (a row of the rollout)."""

    def build():
        position = _position(data, pos)
        if position is None:
            return _empty(NO_ANALYSIS, dark), ""
        pa = open_analysis(data)
        bos = bool(pa.options.get("prepend_bos", True))
        figure = make_composition_heatmap(
            retention.rollout_shares(pa, position),
            pa.str_tokens,
            position,
            source=_position(data, source),
            bos=bos,
            dark=bool(dark),
        )
        caption = (
            f"Each row: the share of every earlier token in the stream at token {position} after "
            "that layer (rows sum to 1). Click a column to follow that token's reach on the right."
        )
        if bos:
            caption += (
                " BOS, usually an attention sink, is off the colour scale (hover for values)."
            )
        return figure, caption

    return _guarded(build, 1, 1, dark)


@callback(
    Output(REACH, "figure"),
    Output(REACH_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(SOURCE, "value"),
    Input(STAGE, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_reach(data, source, stage, dark):
    """How much of the source token reaches every later position at the chosen stage."""

    def build():
        position, after = _position(data, source), as_index(stage)
        if position is None or after is None:
            return _empty(NO_ANALYSIS, dark), ""
        pa = open_analysis(data)
        reach = retention.memory_reach(pa, position, layer=after)
        stage_name = stage_labels(pa.n_layers)[after]
        figure = make_reach_bars(
            reach, pa.str_tokens, position, stage_name=stage_name, dark=bool(dark)
        )
        later = reach[position + 1 :]
        spread = (
            f" Later tokens hold {later.mean():.2f} of it on average, at most {later.max():.2f}."
            if len(later)
            else " It is the last token: nothing comes after it."
        )
        caption = (
            f"The share of token {position} {quoted(pa.str_tokens[position])} in each position's "
            f"stream {stage_name}: how far its memory travels.{spread} Click a bar to see what "
            "that token is made of."
        )
        return figure, caption

    return _guarded(build, 1, 1, dark)


def _lens_notes(pa, lens) -> list[list[str]]:
    """``[n_layers + 1][pos]`` hover lines naming each cell's top logit-lens guess."""
    top = retention.logit_lens_top_k_str(pa, lens)
    return [
        [
            f"top guess {quoted(guesses[0])} ({lens.top_probs[stage, pos, 0]:.2f})"
            for pos, guesses in enumerate(row)
        ]
        for stage, row in enumerate(top)
    ]


def resid_figure(pa, metric: str, pos: int | None, *, dark: bool):
    """The residual-stream heatmap of ``metric`` (see :data:`METRICS`)."""
    lens = retention.logit_lens(pa)
    notes = _lens_notes(pa, lens)
    label = METRICS[metric][0]
    columns = range(pa.n_pos)
    common = {"cell_notes": notes, "selected_column": pos, "dark": dark}
    common["title"] = f"{label}, every layer and position"
    if metric.startswith("next"):
        # Entry i is position i predicting token i + 1.
        columns = range(pa.n_pos - 1)
        common["cell_notes"] = [row[:-1] for row in notes]
        common["column_notes"] = [f"next {quoted(t)}" for t in pa.str_tokens[1:]]
        common["selected_column"] = pos if pos is not None and pos < pa.n_pos - 1 else None
    if metric in ("token_rank", "next_rank"):
        ranks = lens.token_rank if metric == "token_rank" else lens.next_rank
        worst = float(max(lens.token_rank.max(), lens.next_rank.max(initial=0), 1))
        return make_stage_heatmap(
            log_rank(ranks),
            pa.str_tokens,
            columns,
            value_name="rank",
            hover_values=ranks,
            value_format=",d",
            zrange=(0.0, float(log_rank(np.array(worst)))),
            reverse_scale=True,
            colorbar_ticks=rank_ticks(worst),
            **common,
        )
    if metric == "cosine":
        values, name, zrange = retention.embedding_cosine(pa), "cosine", (-1.0, 1.0)
    elif metric == "norm":
        values, name, zrange = retention.resid_norms(pa), "norm", None
    elif metric == "kl":
        values, name, zrange = lens.kl_to_final, "KL (nats)", None
    else:
        values = lens.token_prob if metric == "token_prob" else lens.next_prob
        name, zrange = "probability", (0.0, 1.0)
    return make_stage_heatmap(
        values, pa.str_tokens, columns, value_name=name, zrange=zrange, **common
    )


@callback(
    Output(RESID, "figure"),
    Output(RESID_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(METRIC, "value"),
    Input(POSITION, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_resid(data, metric, pos, dark):
    """One layer x position heatmap of the chosen residual-stream metric."""
    metric = metric if metric in METRICS else DEFAULT_METRIC

    def build():
        if not data:
            return _empty(NO_ANALYSIS, dark), ""
        figure = resid_figure(open_analysis(data), metric, _position(data, pos), dark=bool(dark))
        hint = " Hover a cell for that layer's top guess; click a column to choose the token."
        return figure, METRICS[metric][1] + hint

    return _guarded(build, 1, 1, dark)


@callback(
    Output(LENS, "figure"),
    Output(KL, "figure"),
    Output(LENS_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(POSITION, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_lens(data, pos, dark):
    """The top logit-lens guesses at the chosen token after every layer, and the KL per layer."""

    def build():
        position = _position(data, pos)
        if position is None:
            return _empty(NO_ANALYSIS, dark), _empty("", dark, 200), ""
        pa = open_analysis(data)
        lens = retention.logit_lens(pa)
        top = retention.logit_lens_top_k_str(pa, lens)
        following = pa.str_tokens[position + 1] if position + 1 < pa.n_pos else None
        table = make_top_tokens_table(
            lens.top_probs[:, position],
            [row[position] for row in top],
            pa.str_tokens,
            position,
            next_token=following,
            dark=bool(dark),
        )
        kl = make_kl_chart(
            lens.kl_to_final[:, position], lens.mean_kl_to_final, position, dark=bool(dark)
        )
        caption = (
            "Each layer's stream decoded as if it were the last (nostalgebraist 2020): its five "
            "most probable next tokens (✓ = the token that follows), and below, how far that "
            "guess is from the final one."
        )
        return table, kl, caption

    return _guarded(build, 2, 1, dark)


@callback(
    Output(CURVES, "figure"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(CURVE_TOKENS, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_curves(data, tokens, dark):
    """Lines across the layers for each chosen token."""

    def build():
        if not data:
            return (_empty(NO_ANALYSIS, dark),)
        positions = [p for p in (_position(data, t) for t in tokens or []) if p is not None]
        if not positions:
            return (_empty("Choose tokens to follow, or click them in the token strip.", dark),)
        pa = open_analysis(data)
        curves = retention.retention_curves(pa, positions)
        return (make_retention_curves(curves, pa.str_tokens, positions, dark=bool(dark)),)

    return _guarded(build, 1, 0, dark)


def target_options(pa, pos: int) -> list[dict]:
    """Targets for the attribution at ``pos``: the predicted token, the actual next token, and
    the model's other top guesses."""
    ids, probs = pa.top_k()
    names = pa.top_k_str()[pos]
    options = [
        {
            "label": f"predicted: {quoted(names[0])} ({probs[pos, 0]:.2f})",
            "value": TARGET_PREDICTED,
        }
    ]
    if pos + 1 < pa.n_pos:
        following = pa.str_tokens[pos + 1]
        options.append({"label": f"actual next: {quoted(following)}", "value": TARGET_ACTUAL})
    for rank in range(1, ids.shape[1]):
        options.append(
            {
                "label": f"guess #{rank + 1}: {quoted(names[rank])} ({probs[pos, rank]:.2f})",
                "value": f"token:{int(ids[pos, rank])}",
            }
        )
    return options


@callback(
    Output(TARGET, "options"),
    Output(TARGET, "value"),
    Input(ANALYSIS, "data"),
    Input(POSITION, "data"),
    State(TARGET, "value"),
    prevent_initial_call=True,
)
def update_targets(data, pos, target):
    """Offer the targets of the chosen position, keeping the current one when it still fits."""
    pos = _position(data, pos)
    if pos is None:
        return no_update, no_update
    try:
        options = target_options(open_analysis(data), pos)
    except ValueError:
        return no_update, no_update  # the views report it
    values = [option["value"] for option in options]
    return options, target if target in values else TARGET_PREDICTED


def _target_id(pa, pos: int, target: object) -> int | None:
    """The token id a target names at ``pos`` (None means the predicted token)."""
    if target == TARGET_ACTUAL and pos + 1 < pa.n_pos:
        return int(pa.tokens[pos + 1])
    return _target_token(target)


@callback(
    Output(DLA, "figure"),
    Output(DLA_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(POSITION, "data"),
    Input(TARGET, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_attribution(data, pos, target, dark):
    """Each head's and layer's direct contribution to the target's logit at the chosen token."""

    def build():
        position = _position(data, pos)
        if position is None:
            return _empty(NO_ANALYSIS, dark), ""
        pa = open_analysis(data)
        parts = retention.direct_logit_attribution(pa, position, _target_id(pa, position, target))
        tokenizer = analysis.load_model(pa.model_id, allow_any_path=True).tokenizer
        token = quoted(tokenizer.decode([parts.token]))
        bars = [("embed", parts.embed), ("pos embed", parts.pos_embed)]
        for layer in range(pa.n_layers):
            bars += [(f"L{layer} attn", parts.attn[layer]), (f"L{layer} MLP", parts.mlp[layer])]
        figure = make_attribution_figure(
            parts.heads,
            bars,
            title=f"Logit of {token} at token {position} {quoted(pa.str_tokens[position])}",
            dark=bool(dark),
        )
        caption = (
            f"Direct contribution of each head (left) and each part of the stream (right) to the "
            f"logit of {token}, through the final LayerNorm with its scale frozen; blue raises "
            f"it, red lowers it. The parts plus the unembedding bias ({parts.unembed_bias:+.2f}) "
            f"sum to the logit, {parts.logit:.2f}."
        )
        return figure, caption

    return _guarded(build, 1, 1, dark)


# --- Memory horizon --------------------------------------------------------------------------


@callback(
    Output(HORIZON_DONE, "data"),
    Output(HORIZON_ALERT, "children"),
    Output(HORIZON_ALERT, "is_open"),
    Input(HORIZON_RUN, "n_clicks"),
    State(ANALYSIS, "data"),
    background=True,
    progress=[
        Output(HORIZON_PROGRESS, "value"),
        Output(HORIZON_PROGRESS, "max"),
        Output(HORIZON_PROGRESS, "label"),
    ],
    progress_default=[0, 1, ""],
    running=[
        (Output(HORIZON_RUN, "disabled"), True, False),
        (Output(HORIZON_CANCEL, "disabled"), False, True),
    ],
    cancel=[Input(HORIZON_CANCEL, "n_clicks")],
    prevent_initial_call=True,
)
@limited_job(lambda message: (no_update, *alert_update(message)))
def run_horizon(set_progress, n_clicks, data):
    """Measure the loss on every token with truncated context, batch by batch, into the cache.

    Runs in a worker process of the app's background-callback manager; Cancel ends that process
    (nothing half-done is cached). Returns a small marker; :func:`show_horizon` reads the result.
    """
    if not data:
        return no_update, *alert_update("Analyse a prompt first: the horizon is measured on it.")

    def report(done: int, total: int) -> None:
        set_progress((done, max(total, 1), f"{done}/{total} batches"))

    try:
        pa = open_analysis(data)
        memory_horizon(pa, progress=report)
    except ValueError as exc:
        logger.info("memory horizon refused: %s", exc)
        return no_update, *alert_update(str(exc))
    set_progress((1, 1, "done"))  # also when the result came from the cache
    return {"key": pa.key}, *alert_update(None)


def cached_horizon(pa):
    """The memory horizon of ``pa`` when it is cached, else None; never runs the model.

    ``should_stop`` answering True at once makes a cache miss stop before the first batch.
    """
    return memory_horizon(pa, should_stop=lambda: True)


@callback(
    Output(HORIZON, "figure"),
    Output(HORIZON_CURVE, "figure"),
    Output(HORIZON_CAPTION, "children"),
    *ALERT_OUTPUTS,
    Input(ANALYSIS, "data"),
    Input(HORIZON_DONE, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def show_horizon(data, _done, dark):
    """The cached memory horizon of the analysed prompt, or a hint to run it."""

    def build():
        if not data:
            return _empty(NO_ANALYSIS, dark), _empty("", dark), ""
        pa = open_analysis(data)
        result = cached_horizon(pa)
        if result is None:
            hint = "Press Run to measure how far back each prediction looks."
            return _empty(hint, dark), _empty("", dark), ""
        horizon = result.horizon(HORIZON_TOLERANCE)
        heatmap = make_horizon_heatmap(
            result.loss,
            result.k_values,
            result.context,
            result.full_loss,
            horizon,
            pa.str_tokens,
            dark=bool(dark),
        )
        curve = make_horizon_curve(
            result.k_values, result.mean_loss, float(result.full_loss.mean()), dark=bool(dark)
        )
        caption = (
            "Each column is one prediction; higher rows give the model more of the tokens just "
            f"before it. A dot marks the horizon, the shortest context within {HORIZON_TOLERANCE} "
            f"nats of the full-context loss (median {int(np.median(horizon))} tokens). Blank "
            "cells: fewer tokens exist before that prediction."
        )
        return heatmap, curve, caption

    return _guarded(build, 2, 1, dark)
