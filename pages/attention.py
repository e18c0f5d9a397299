"""Attention explorer: where every head of every layer looks, for one prompt.

The Analyse button runs one forward pass (``analysis.analyze``); everything after that — choosing
a layer, a head or a token, switching light/dark — reads the cached analysis back and never runs
the model. Browser state is only the model name, the prompt and the view indices, in the URL and
in small stores; arrays stay in the disk cache.
"""

# No ``from __future__ import annotations`` here: Dash runs page modules before it lists them in
# sys.modules, and dataclasses with string annotations look their module up there.
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
import numpy as np
from dash import (
    ALL,
    Input,
    Output,
    Patch,
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
from analysis.attention_stats import STAT_TITLES, head_stats, token_flow
from analysis.bundle import collect_report
from analysis.models import usable_model
from analysis.settings import get_settings
from components.alerts import alert_update, make_error_alert
from components.download import (
    ReportDownloadIds,
    make_figure_download,
    make_report_download,
    register_report_download,
)
from components.heatmaps import (
    downsample_attention,
    grid_selection_shapes,
    make_attention_heatmap,
    make_empty_figure,
    make_head_grid,
    make_layer_head_panels,
    make_model_overview,
    overview_shapes,
    overview_starts,
    panel_selection_shapes,
    parse_overview_click,
    parse_panel_click,
)
from components.prompt_panel import (
    DEFAULT_PROMPT,
    PromptPanelIds,
    make_prompt_panel,
    register_example_callback,
)
from components.recent_menu import remember_view
from components.shell import COLOR_MODE_SWITCH, LAST_ANALYSIS_STORE, make_card
from components.tokens import (
    SELECTED_TOKEN_CLASS,
    TOKEN_CLASS,
    display_token,
    make_token_strip,
)
from components.url_state import QueryReader, as_index

register_page(
    __name__,
    path="/",
    redirect_from=["/attention"],
    name="Attention",
    title="MemLens · Attention",
    description="Where every attention head looks, token by token.",
    order=0,
)
logger = logging.getLogger(__name__)

# Component ids, declared once.
PAGE = "attention"
PANEL = PromptPanelIds(PAGE)
REPORT = ReportDownloadIds(PAGE)
ALERT = "attention-alert"
URL = "attention-url"
ANALYSIS = "attention-analysis"
REQUEST = "attention-request"
TOKEN = "attention-token"
TOKEN_CHIP = "attention-token-chip"
STRIP = "attention-token-strip"
LAYER = "attention-layer"
HEAD = "attention-head"
HEAD_FIGURE = "attention-head-figure"
HEAD_CAPTION = "attention-head-caption"
GRID = "attention-grid"
OVERVIEW = "attention-overview"
SUMMARY = "attention-summary"
FLOW = "attention-token-flow"
FLOW_CAPTION = "attention-token-flow-caption"

# Spinners appear only for updates slower than this, so head switches do not flicker.
SPINNER_DELAY_MS = 400
SUMMARY_CACHE_SIZE = 16


# --- URL state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewState:
    """What a link asks the page to show."""

    model: str
    prompt: str
    layer: int = 0
    head: int = 0
    token: int | None = None
    truncate: bool = False
    from_url: bool = False


def parse_view_query(query: dict, *, default_model: str) -> tuple[ViewState, list[str]]:
    """The view that URL query parameters ask for, and a message for each unusable one.

    Args:
        query: Parameters as Dash pages passes them to ``layout``: a string per key, or a list
            when the key repeats.
        default_model: Model to use when the link names none.

    Returns:
        ``(state, messages)``; unusable values fall back to the defaults.
    """
    read = QueryReader(query)
    prompt = read.text("prompt")
    state = ViewState(
        model=read.text("model") or default_model,
        prompt=prompt or DEFAULT_PROMPT,
        layer=read.index("layer", 0),
        head=read.index("head", 0),
        token=read.index("token", None),
        truncate=read.text("truncate") in ("1", "true"),
        from_url=prompt is not None,
    )
    return state, read.messages


def view_search(data: dict | None, layer: object, head: object, token: object) -> str:
    """The query string that reopens this view: ``?model=…&prompt=…&layer=…&head=…[&token=…]``."""
    if not data:
        return ""
    params = {"model": data["model"], "prompt": data["prompt"]}
    params |= {"layer": as_index(layer) or 0, "head": as_index(head) or 0}
    if as_index(token) is not None:
        params["token"] = as_index(token)
    if data.get("truncate"):
        params["truncate"] = 1
    return "?" + urlencode(params)


def _clamp(value: int | None, count: int, name: str, messages: list[str]) -> int:
    if value is None:
        return 0
    if value >= count:
        messages.append(f"{name} {value} does not exist (0–{count - 1}); showing {name} 0")
        return 0
    return value


# --- Reading the cached analysis -------------------------------------------------------------


def open_analysis(data: dict) -> analysis.PromptAnalysis:
    """The cached analysis a store entry names (a cache hit; recomputed if it was evicted)."""
    return analysis.analyze(data["prompt"], data["model"], truncate=bool(data.get("truncate")))


@dataclass(frozen=True)
class PromptSummary:
    """Whole-model numbers for one analysed prompt, computed in one pass over the layers.

    Attributes:
        stats: ``[n_layers, n_heads, 4]`` head summaries (see :data:`STAT_TITLES`).
        received: ``[n_layers, n_heads, pos]`` mean attention each token gets from later ones.
        sent: ``[n_layers, n_heads, pos]`` attention each token puts on earlier ones.
        thumbnails: ``[n_layers, n_heads, tile, tile]`` block maxima for the model overview.
        starts: ``[tile]`` first position of each thumbnail block.
    """

    stats: np.ndarray
    received: np.ndarray
    sent: np.ndarray
    thumbnails: np.ndarray
    starts: np.ndarray


# Derived from immutable cache entries, keyed by the analysis key: safe to share between users.
# Each worker process keeps its own few; a miss costs one read of every layer.
_summaries: OrderedDict[str, PromptSummary] = OrderedDict()
_summary_locks: dict[str, threading.Lock] = {}
_summaries_guard = threading.Lock()


def prompt_summary(pa: analysis.PromptAnalysis) -> PromptSummary:
    """The :class:`PromptSummary` of ``pa``, computed once per process and analysis."""
    with _summaries_guard:
        if pa.key in _summaries:
            _summaries.move_to_end(pa.key)
            return _summaries[pa.key]
        lock = _summary_locks.setdefault(pa.key, threading.Lock())

    with lock:  # several figures ask at once after an analysis; one of them computes
        with _summaries_guard:
            if pa.key in _summaries:
                return _summaries[pa.key]
        starts = overview_starts(pa.n_pos, pa.n_layers * pa.n_heads)
        stats, received, sent, thumbnails = [], [], [], []
        for layer in range(pa.n_layers):
            pattern = pa.attention(layer)  # [n_heads, q_pos, k_pos]
            stats.append(head_stats(pattern))
            layer_received, layer_sent = token_flow(pattern)
            received.append(layer_received)
            sent.append(layer_sent)
            thumbnails.append(downsample_attention(pattern, starts))
        summary = PromptSummary(
            np.stack(stats), np.stack(received), np.stack(sent), np.stack(thumbnails), starts
        )
        with _summaries_guard:
            _summaries[pa.key] = summary
            _summary_locks.pop(pa.key, None)
            while len(_summaries) > SUMMARY_CACHE_SIZE:
                _summaries.popitem(last=False)
    return summary


# --- Layout ----------------------------------------------------------------------------------


def _graph(graph_id: str, figure, *, modebar: bool = False) -> html.Div:
    config = {"displaylogo": False, "displayModeBar": "hover" if modebar else False}
    graph = dcc.Loading(
        dcc.Graph(id=graph_id, figure=figure, config=config),
        delay_show=SPINNER_DELAY_MS,
        type="circle",
    )
    return html.Div([graph, make_figure_download(graph_id)])


def _hint(text: str) -> html.Small:
    return html.Small(text, className="text-body-secondary")


def _picker(picker_id: str, label: str, value: int) -> dbc.InputGroup:
    return dbc.InputGroup(
        [
            dbc.InputGroupText(label),
            dbc.Select(id=picker_id, options=[], value=str(value), style={"minWidth": "5rem"}),
        ],
        size="sm",
        class_name="w-auto",
    )


def layout(**query) -> html.Div:
    """The page for a URL's query parameters; works with none."""
    state, messages = parse_view_query(query, default_model=get_settings().default_model)
    empty = make_empty_figure("Analyse a prompt to see its attention.")
    pickers = html.Div(
        [_picker(LAYER, "Layer", state.layer), _picker(HEAD, "Head", state.head)],
        className="d-flex gap-2",
    )
    prompt_panel = make_prompt_panel(
        PANEL,
        models=analysis.available_models(),
        model=state.model,
        prompt=state.prompt,
        truncate=state.truncate,
        actions=make_report_download(REPORT),
    )
    tokens = make_card(
        "Tokens",
        dcc.Loading(html.Div(id=STRIP), delay_show=SPINNER_DELAY_MS),
        extra=_hint("Click a token to follow its attention. · is a space, ↵ a newline."),
        class_name="h-100",
    )
    head = make_card(
        "Head",
        [html.Div(id=HEAD_CAPTION, className="small"), _graph(HEAD_FIGURE, empty, modebar=True)],
        extra=pickers,
    )
    grid = make_card("All heads of this layer", _graph(GRID, empty), extra=_hint("Click a head"))
    flow = make_card(
        "Selected token",
        [html.Div(id=FLOW_CAPTION, className="small"), _graph(FLOW, empty)],
    )
    overview = make_card(
        "Whole model", _graph(OVERVIEW, empty), extra=_hint("Layers down, heads across")
    )
    summary = make_card(
        "Head summary for this prompt",
        _graph(SUMMARY, empty),
        extra=_hint("Averages over queries after the first"),
    )

    return html.Div(
        [
            dcc.Location(id=URL, refresh=False),
            dcc.Store(id=ANALYSIS),
            dcc.Store(
                id=REQUEST,
                data={"from_url": state.from_url, "token": state.token, "messages": messages},
            ),
            dcc.Store(id=TOKEN, data=state.token),
            make_error_alert(ALERT, " ".join(messages) or None),
            dbc.Row(
                [
                    dbc.Col(prompt_panel, lg=5, class_name="mb-3"),
                    dbc.Col(tokens, lg=7, class_name="mb-3"),
                ]
            ),
            dbc.Row([dbc.Col(head, xl=7), dbc.Col([grid, flow], xl=5)]),
            dbc.Row([dbc.Col(overview, xl=6), dbc.Col(summary, xl=6)]),
        ]
    )


# --- Callbacks -------------------------------------------------------------------------------

register_example_callback(PANEL)


def _options(count: int, prefix: str) -> list[dict]:
    return [{"label": f"{prefix}{index}", "value": str(index)} for index in range(count)]


@callback(
    Output(ANALYSIS, "data"),
    Output(LAYER, "options"),
    Output(LAYER, "value"),
    Output(HEAD, "options"),
    Output(HEAD, "value"),
    Output(STRIP, "children"),
    Output(TOKEN, "data"),
    Output(ALERT, "children"),
    Output(ALERT, "is_open"),
    Output(PANEL.prompt, "value"),
    Output(PANEL.model, "value"),
    Output(PANEL.truncate, "value"),
    Input(PANEL.analyse, "n_clicks"),
    State(PANEL.prompt, "value"),
    State(PANEL.model, "value"),
    State(PANEL.truncate, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
    State(REQUEST, "data"),
    State(LAST_ANALYSIS_STORE, "data"),
)
def analyse(n_clicks, prompt, model, truncate, layer, head, request, last):
    """Analyse the prompt (a cache hit when seen before); reset pickers, tokens and the alert.

    On page load (no click yet) it opens what the link asks for, else this tab's last analysis,
    else the example in the prompt box.
    """
    first_load = not n_clicks
    request = request or {}
    messages = list(request.get("messages", [])) if first_load else []
    if first_load and not request.get("from_url") and isinstance(last, dict):
        prompt, model = last.get("prompt", prompt), last.get("model", model)
        truncate = last.get("truncate", truncate)
    if first_load:
        model = usable_model(model, get_settings().default_model, messages)
    truncate = bool(truncate)

    try:
        pa = analysis.analyze(prompt, model, truncate=truncate)
    except ValueError as exc:
        logger.info("analysis refused: %s", exc)
        messages.append(str(exc))
        nothing = [no_update] * 7
        return (*nothing, *alert_update(" ".join(messages)), prompt, model, truncate)

    layer = _clamp(as_index(layer), pa.n_layers, "layer", messages)
    head = _clamp(as_index(head), pa.n_heads, "head", messages)
    token = as_index(request.get("token")) if first_load else None
    if token is not None and token >= pa.n_pos:
        messages.append(f"token {token} does not exist (the prompt has {pa.n_pos} tokens)")
        token = None
    data = {
        "model": model,
        "prompt": prompt,
        "truncate": truncate,
        "n_layers": pa.n_layers,
        "n_heads": pa.n_heads,
        "n_pos": pa.n_pos,
    }
    if not first_load or request.get("from_url"):  # asked for, not a reopened example
        remember_view(
            "/", view_search(data, layer, head, token), model, prompt, {"truncate": truncate}
        )
    strip = make_token_strip(pa.str_tokens, token_type=TOKEN_CHIP, selected=token)
    dropped = int(pa.meta.get("original_length", pa.n_pos)) - pa.n_pos
    if dropped > 0:
        note = f"The first {dropped:,} tokens did not fit the model and were left out."
        strip = html.Div([html.Div(note, className="small text-warning-emphasis mb-1"), strip])
    return (
        data,
        _options(pa.n_layers, "L"),
        str(layer),
        _options(pa.n_heads, "H"),
        str(head),
        strip,
        token,
        *alert_update(" ".join(messages) or None),
        prompt,
        model,
        truncate,
    )


def report_inputs(data: dict | None, layer: object, head: object):
    """What the report bundle shows: the whole model, then the chosen layer and head."""
    if not data:
        raise ValueError("analyse a prompt first; the report shows its analysis")
    pa = open_analysis(data)
    selected = _selection(data, layer, head)
    if selected is None:
        return collect_report(pa)
    return collect_report(pa, layers=[selected[0]], heads=[selected[1]])


register_report_download(
    REPORT, [State(ANALYSIS, "data"), State(LAYER, "value"), State(HEAD, "value")], report_inputs
)


@callback(
    Output(LAST_ANALYSIS_STORE, "data", allow_duplicate=True),
    Input(ANALYSIS, "data"),
    prevent_initial_call=True,
)
def remember_analysis(data):
    """Remember this tab's last prompt and model, for the next page to open on.

    The app-wide store has several writers, hence ``allow_duplicate`` (see
    :func:`components.shell.make_app_stores`).
    """
    if not data:
        return no_update
    return {key: data.get(key) for key in ("model", "prompt", "truncate")}


def _selection(data: dict | None, layer: object, head: object) -> tuple[int, int] | None:
    """``(layer, head)`` when both are valid for the analysis in ``data``."""
    layer, head = as_index(layer), as_index(head)
    if not data or layer is None or head is None:
        return None
    if layer >= data["n_layers"] or head >= data["n_heads"]:
        return None
    return layer, head


@callback(
    Output(HEAD_FIGURE, "figure"),
    Output(HEAD_CAPTION, "children"),
    Input(ANALYSIS, "data"),
    Input(LAYER, "value"),
    Input(HEAD, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
)
def show_head(data, layer, head, dark):
    """The chosen head's attention, labelled with the tokens, and its summary numbers."""
    if not data:
        return make_empty_figure("Analyse a prompt to see its attention.", dark=dark), ""
    selected = _selection(data, layer, head)
    if selected is None:
        return no_update, no_update
    layer, head = selected

    pa = open_analysis(data)
    pattern = pa.attention(layer)[head]  # [q_pos, k_pos]
    figure = make_attention_heatmap(pattern, pa.str_tokens, dark=bool(dark))
    numbers = head_stats(pattern)
    caption = " · ".join(
        f"{title} {value:.2f}" for title, value in zip(STAT_TITLES.values(), numbers, strict=True)
    )
    return figure, f"L{layer} H{head}: {caption}"


@callback(
    Output(GRID, "figure"),
    Input(ANALYSIS, "data"),
    Input(LAYER, "value"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(HEAD, "value"),
)
def show_layer(data, layer, dark, head):
    """Thumbnails of every head in the chosen layer, the chosen head framed."""
    if not data:
        return make_empty_figure("No analysis yet.", dark=dark, height=200)
    selected = _selection(data, layer, head)
    if selected is None:
        return no_update
    layer, head = selected
    patterns = open_analysis(data).attention(layer)
    return make_head_grid(patterns, layer=layer, selected_head=head, dark=bool(dark))


@callback(
    Output(OVERVIEW, "figure"),
    Input(ANALYSIS, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
)
def show_overview(data, dark, layer, head):
    """Every head of every layer as a thumbnail."""
    if not data:
        return make_empty_figure("No analysis yet.", dark=dark, height=200)
    summary = prompt_summary(open_analysis(data))
    return make_model_overview(
        summary.thumbnails,
        summary.starts,
        selected=_selection(data, layer, head),
        dark=bool(dark),
    )


# Entropy and distance have no natural top; the two fractions run from 0 to 1.
_SUMMARY_RANGES = [None, None, (0.0, 1.0), (0.0, 1.0)]


@callback(
    Output(SUMMARY, "figure"),
    Input(ANALYSIS, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
)
def show_summary(data, dark, layer, head):
    """Entropy, mean distance, max weight and first-token attention of every head."""
    if not data:
        return make_empty_figure("No analysis yet.", dark=dark, height=200)
    stats = prompt_summary(open_analysis(data)).stats  # [n_layers, n_heads, 4]
    panels = [(title, stats[..., index]) for index, title in enumerate(STAT_TITLES.values())]
    return make_layer_head_panels(
        panels,
        selected=_selection(data, layer, head),
        dark=bool(dark),
        ranges=_SUMMARY_RANGES,
        columns=2,
    )


def flow_caption(str_tokens: list[str], token: int) -> str:
    """What the token-flow panels show, for ``token`` (plain text; Dash escapes it)."""
    shown = display_token(str_tokens[token])
    text = f"Token {token} “{shown}”: mean weight later tokens put on it, and weight it puts on"
    text += " earlier tokens, for every layer and head."
    if token == len(str_tokens) - 1:
        text += " Nothing comes after the last token, so it receives nothing."
    if token == 0:
        text += " The first token has nothing before it, so it sends nothing."
    return text


@callback(
    Output(FLOW, "figure"),
    Output(FLOW_CAPTION, "children"),
    Input(ANALYSIS, "data"),
    Input(TOKEN, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
)
def show_token_flow(data, token, dark, layer, head):
    """For the clicked token: attention received from later tokens and sent to earlier ones."""
    token = as_index(token)
    if not data or token is None or token >= data["n_pos"]:
        message = "Click a token above, or a row of the head's heatmap."
        return make_empty_figure(message, dark=dark, height=200), ""
    pa = open_analysis(data)
    summary = prompt_summary(pa)
    panels = [
        ("received from later tokens", summary.received[:, :, token]),
        ("sent to earlier tokens", summary.sent[:, :, token]),
    ]
    figure = make_layer_head_panels(
        panels,
        selected=_selection(data, layer, head),
        dark=bool(dark),
        ranges=[(0.0, 1.0), (0.0, 1.0)],
    )
    return figure, flow_caption(pa.str_tokens, token)


@callback(
    Output(GRID, "figure", allow_duplicate=True),
    Output(OVERVIEW, "figure", allow_duplicate=True),
    Output(SUMMARY, "figure", allow_duplicate=True),
    Output(FLOW, "figure", allow_duplicate=True),
    Input(LAYER, "value"),
    Input(HEAD, "value"),
    State(ANALYSIS, "data"),
    State(TOKEN, "data"),
    State(COLOR_MODE_SWITCH, "value"),
    prevent_initial_call=True,
)
def frame_selection(layer, head, data, token, dark):
    """Move the frame around the chosen head in the other figures, without rebuilding them."""
    selected = _selection(data, layer, head)
    if selected is None:
        return [no_update] * 4
    layer, head = selected
    dark = bool(dark)
    tile = len(overview_starts(data["n_pos"], data["n_layers"] * data["n_heads"]))

    shapes = [
        grid_selection_shapes(head, data["n_heads"], dark=dark),
        overview_shapes(data["n_layers"], data["n_heads"], tile, selected, dark=dark),
        panel_selection_shapes(layer, head, len(STAT_TITLES), dark=dark),
        panel_selection_shapes(layer, head, 2, dark=dark),
    ]
    patches = []
    for figure_shapes in shapes:
        patch = Patch()
        patch["layout"]["shapes"] = figure_shapes
        patches.append(patch)
    if as_index(token) is None:
        patches[3] = no_update  # the flow figure is a placeholder until a token is chosen
    return patches


def selection_from_click(
    source: str, click_data: dict | None, layer: object
) -> tuple[int, int] | None:
    """``(layer, head)`` that a click on the grid, overview, summary or flow figure chose."""
    if not click_data:
        return None
    if source == GRID:
        try:
            head = int(click_data["points"][0]["curveNumber"])
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        current = as_index(layer)
        return None if current is None else (current, head)
    if source == OVERVIEW:
        return parse_overview_click(click_data)
    if source in (SUMMARY, FLOW):
        return parse_panel_click(click_data)
    return None


@callback(
    Output(LAYER, "value", allow_duplicate=True),
    Output(HEAD, "value", allow_duplicate=True),
    Input(GRID, "clickData"),
    Input(OVERVIEW, "clickData"),
    Input(SUMMARY, "clickData"),
    Input(FLOW, "clickData"),
    State(LAYER, "value"),
    State(ANALYSIS, "data"),
    prevent_initial_call=True,
)
def choose_head(grid_click, overview_click, summary_click, flow_click, layer, data):
    """Clicking a head in any figure makes it the chosen layer and head."""
    clicks = {GRID: grid_click, OVERVIEW: overview_click, SUMMARY: summary_click}
    clicks[FLOW] = flow_click
    picked = selection_from_click(ctx.triggered_id, clicks.get(ctx.triggered_id), layer)
    if picked is None or _selection(data, *picked) is None:
        return no_update, no_update
    return str(picked[0]), str(picked[1])


def token_from_heatmap_click(click_data: dict | None) -> int | None:
    """The query position of a click on the head heatmap (first position of a block)."""
    try:
        label = click_data["points"][0]["y"]  # type: ignore[index]
        return int(label.split(" ", 1)[0].split("–", 1)[0])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


@callback(
    Output(TOKEN, "data", allow_duplicate=True),
    Input({"type": TOKEN_CHIP, "index": ALL}, "n_clicks"),
    Input(HEAD_FIGURE, "clickData"),
    prevent_initial_call=True,
)
def choose_token(_chip_clicks, heatmap_click):
    """Clicking a token chip, or a query row of the heatmap, selects that token."""
    if ctx.triggered_id == HEAD_FIGURE:
        token = token_from_heatmap_click(heatmap_click)
    elif isinstance(ctx.triggered_id, dict) and ctx.triggered[0].get("value"):
        token = ctx.triggered_id["index"]  # a real click, not a freshly drawn strip
    else:
        token = None
    return no_update if token is None else token


clientside_callback(
    f"""
    function(selected, ids) {{
        return ids.map(id => id.index === selected ? '{SELECTED_TOKEN_CLASS}' : '{TOKEN_CLASS}');
    }}
    """,
    Output({"type": TOKEN_CHIP, "index": ALL}, "className"),
    Input(TOKEN, "data"),
    State({"type": TOKEN_CHIP, "index": ALL}, "id"),
)


# The address bar follows the view in the browser: a switch then costs one server request
# fewer. The query is the one view_search builds (same keys, form-encoded), which
# parse_view_query reads back; the browser tests check the round trip.
clientside_callback(
    """
    function(data, layer, head, token) {
        if (!data) { return window.dash_clientside.no_update; }
        const index = value => {
            const number = Number(value);
            const ok = typeof value !== 'boolean' && value !== null && value !== ''
                && Number.isInteger(number) && number >= 0;
            return ok ? number : null;
        };
        const params = new URLSearchParams({
            model: data.model, prompt: data.prompt,
            layer: index(layer) ?? 0, head: index(head) ?? 0,
        });
        if (index(token) !== null) { params.set('token', index(token)); }
        if (data.truncate) { params.set('truncate', 1); }
        return '?' + params.toString();
    }
    """,
    Output(URL, "search"),
    Input(ANALYSIS, "data"),
    Input(LAYER, "value"),
    Input(HEAD, "value"),
    Input(TOKEN, "data"),
    prevent_initial_call=True,
)
