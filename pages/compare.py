"""Compare: two prompts on one model side by side, activation patching, and prompt sets.

Prompts A and B are analysed once each (``analysis.analyze``, cached); one layer, head and token
selection drives the views of both. Differences are ``A − B`` over aligned token pairs: position
by position when the counts match, otherwise by the alignment the user picks (from the end, or
by matching tokens). The URL holds the model, both prompts, layer, head, alignment and tab, so a
copied link reopens the view. Patching and prompt sets run as background jobs
(``pages/compare_jobs.py``).
"""

# No ``from __future__ import annotations``: Dash runs page modules before it lists them in
# sys.modules, and dataclasses with string annotations look their module up there.
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
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
from dash.exceptions import MissingCallbackContextException

import analysis
from analysis.compare import (
    ALIGN_MODES,
    align_tokens,
    attention_difference,
    embedding_cosine_difference,
    residual_norm_difference,
)
from analysis.models import usable_model
from analysis.retention import embedding_cosine, resid_norms
from analysis.settings import get_settings
from components.alerts import alert_update, make_error_alert
from components.compare import (
    block_index,
    highlight_shape,
    make_attention_difference,
    make_value_heatmap,
    pair_axis_labels,
    symmetric_range,
    token_axis_labels,
)
from components.download import (
    ReportDownloadIds,
    make_figure_download,
    make_report_download,
    register_report_download,
)
from components.export import FigureReport, ReportFigure
from components.heatmaps import MAX_HEAD_SIDE, make_attention_heatmap, make_empty_figure
from components.prompt_panel import model_options
from components.recent_menu import remember_view
from components.shell import COLOR_MODE_SWITCH, make_card
from components.tokens import SELECTED_TOKEN_CLASS, TOKEN_CLASS, make_token_strip
from components.url_state import QueryReader
from pages.compare_jobs import (
    COMPARED,
    HEAD,
    LAYER,
    MODEL,
    as_index,
    patching_tab,
    prompt_set_tab,
)

register_page(
    __name__,
    path="/compare",
    name="Compare",
    title="MemLens · Compare",
    description="Two prompts side by side, activation patching and prompt sets.",
    order=5,
)
logger = logging.getLogger(__name__)

# Component ids, declared once (the ones shared with the jobs live in compare_jobs).
URL = "compare-url"
ALERT = "compare-alert"
REQUEST = "compare-request"
PROMPT_A = "compare-prompt-a"
PROMPT_B = "compare-prompt-b"
ALIGN = "compare-align"
RUN = "compare-run"
TABS = "compare-tabs"
PAIR_INPUTS = "compare-pair-inputs"
PAIR_CONTROLS = "compare-pair-controls"
CAPTION = "compare-caption"
STRIP_A = "compare-strip-a"
STRIP_B = "compare-strip-b"
CHIP_A = "compare-token-a"
CHIP_B = "compare-token-b"
TOKEN = "compare-token"
ATTN_A = "compare-attention-a"
ATTN_B = "compare-attention-b"
ATTN_DIFF = "compare-attention-diff"
RET_MEASURE = "compare-retention-measure"
RET_A = "compare-retention-a"
RET_B = "compare-retention-b"
RET_DIFF = "compare-retention-diff"
REPORT = ReportDownloadIds("compare")

# A differs from B in one token that an induction head copies, so the pair is also a patching
# example: the clean answer is " m" (of " mat"), the corrupted one " h" (of " hat").
DEFAULT_PROMPT_A = "The cat sat on the mat. The cat sat on the"
DEFAULT_PROMPT_B = "The cat sat on the hat. The cat sat on the"
TABS_SHOWN = ("pair", "patching", "set")
ALIGN_TITLES = {"end": "by position from the end", "match": "by matching tokens"}
RETENTION_TITLES = {
    "cosine": "Cosine to the token's own embedding",
    "norm": "Residual-stream norm",
}
RETENTION_SHORT = {"cosine": "cosine to own embedding", "norm": "residual norm"}
FIGURE_HEIGHT = 430


# --- URL state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareState:
    """What a link asks the page to show."""

    model: str
    prompt_a: str = DEFAULT_PROMPT_A
    prompt_b: str = DEFAULT_PROMPT_B
    layer: int = 0
    head: int = 0
    align: str = "end"
    tab: str = "pair"


def parse_compare_query(query: dict, *, default_model: str) -> tuple[CompareState, list[str]]:
    """The view that URL query parameters ask for, and a message for each unusable one.

    Args:
        query: Parameters as Dash pages passes them to ``layout``: a string per key, or a list
            when the key repeats.
        default_model: Model to use when the link names none.

    Returns:
        ``(state, messages)``; unusable values fall back to the defaults.
    """
    read = QueryReader(query)
    state = CompareState(
        model=read.text("model") or default_model,
        prompt_a=read.text("prompt_a") or DEFAULT_PROMPT_A,
        prompt_b=read.text("prompt_b") or DEFAULT_PROMPT_B,
        layer=read.index("layer", 0, digits_only=True),
        head=read.index("head", 0, digits_only=True),
        align=read.choice("align", ALIGN_MODES, "end"),
        tab=read.choice("tab", TABS_SHOWN, "pair"),
    )
    return state, read.messages


def compare_search(data: dict | None, layer: object, head: object, tab: object) -> str:
    """The query string that reopens this view."""
    params: dict = {}
    if data:
        params |= {"model": data["model"], "prompt_a": data["prompt_a"]}
        params |= {"prompt_b": data["prompt_b"], "align": data["align"]}
        params |= {"layer": as_index(layer) or 0, "head": as_index(head) or 0}
    if tab in TABS_SHOWN:
        params["tab"] = tab
    return "?" + urlencode(params) if params else ""


# --- Layout ----------------------------------------------------------------------------------


def _graph(graph_id: str) -> html.Div:
    config = {"displaylogo": False, "displayModeBar": "hover"}
    empty = make_empty_figure("Compare two prompts to see this view.", height=FIGURE_HEIGHT)
    graph = dcc.Loading(
        dcc.Graph(id=graph_id, figure=empty, config=config), delay_show=400, type="circle"
    )
    return html.Div([graph, make_figure_download(graph_id)])


def _picker(picker_id: str, label: str, value: int) -> dbc.InputGroup:
    select = dbc.Select(id=picker_id, options=[], value=str(value), style={"minWidth": "5rem"})
    return dbc.InputGroup([dbc.InputGroupText(label), select], size="sm", class_name="w-auto")


def _prompt_box(box_id: str, label: str, value: str) -> html.Div:
    return html.Div(
        [
            dbc.Label(label, html_for=box_id, class_name="small fw-semibold mb-1"),
            dbc.Textarea(
                id=box_id, value=value, rows=3, class_name="font-monospace", spellcheck=False
            ),
        ]
    )


def _three(ids: tuple[str, str, str]) -> dbc.Row:
    """A, B and A − B side by side."""
    return dbc.Row([dbc.Col(_graph(graph_id), xl=4) for graph_id in ids], class_name="g-2")


def layout(**query) -> html.Div:
    """The page for a URL's query parameters; works with none."""
    state, messages = parse_compare_query(query, default_model=get_settings().default_model)
    pair_only = state.tab == "set"  # hidden on the prompt-set tab
    prompts = html.Div(
        dbc.Row(
            [
                dbc.Col(_prompt_box(PROMPT_A, "Prompt A (clean)", state.prompt_a), md=6),
                dbc.Col(_prompt_box(PROMPT_B, "Prompt B (corrupted)", state.prompt_b), md=6),
            ],
            class_name="g-2 mb-2",
        ),
        id=PAIR_INPUTS,
        hidden=pair_only,
    )
    align = html.Div(
        [
            html.Span("Align tokens", className="small me-2"),
            dbc.RadioItems(
                id=ALIGN,
                options=[{"label": title, "value": m} for m, title in ALIGN_TITLES.items()],
                value=state.align,
                inline=True,
                class_name="small",
            ),
        ],
        className="d-flex align-items-center",
    )
    model = dbc.InputGroup(
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
    )
    controls = html.Div(
        [
            model,
            _picker(LAYER, "Layer", state.layer),
            _picker(HEAD, "Head", state.head),
            html.Div(
                html.Div(
                    [align, dbc.Button("Compare", id=RUN, color="primary", n_clicks=0)],
                    className="d-flex flex-wrap gap-3 align-items-center justify-content-between",
                ),
                id=PAIR_CONTROLS,
                hidden=pair_only,
                className="flex-grow-1",
            ),
        ],
        className="d-flex flex-wrap gap-3 align-items-center",
    )
    tokens = dbc.Row(
        [
            dbc.Col([html.Div("A", className="small fw-semibold"), html.Div(id=STRIP_A)], md=6),
            dbc.Col([html.Div("B", className="small fw-semibold"), html.Div(id=STRIP_B)], md=6),
        ],
        class_name="g-2",
    )
    retention_picker = dbc.RadioItems(
        id=RET_MEASURE,
        options=[{"label": title, "value": key} for key, title in RETENTION_TITLES.items()],
        value="cosine",
        inline=True,
        class_name="small",
    )
    pair_tab = html.Div(
        [
            html.Div(
                [html.Div(id=CAPTION, className="fw-semibold"), make_report_download(REPORT)],
                className="d-flex flex-wrap gap-2 align-items-center justify-content-between mb-2",
            ),
            make_card(
                "Tokens",
                tokens,
                extra=html.Small(
                    "Click a token: its partner in the other prompt is selected too.",
                    className="text-body-secondary",
                ),
            ),
            make_card("Attention of the chosen head", _three((ATTN_A, ATTN_B, ATTN_DIFF))),
            make_card("Retention", _three((RET_A, RET_B, RET_DIFF)), extra=retention_picker),
        ],
        className="pt-3",
    )
    tabs = dbc.Tabs(
        [
            dbc.Tab(pair_tab, label="Side by side", tab_id="pair"),
            dbc.Tab(
                html.Div(patching_tab(), className="pt-3"),
                label="Activation patching",
                tab_id="patching",
            ),
            dbc.Tab(html.Div(prompt_set_tab(), className="pt-3"), label="Prompt set", tab_id="set"),
        ],
        id=TABS,
        active_tab=state.tab,
    )
    return html.Div(
        [
            dcc.Location(id=URL, refresh=False),
            dcc.Store(id=COMPARED),
            dcc.Store(id=REQUEST, data={"messages": messages}),
            dcc.Store(id=TOKEN),
            make_error_alert(ALERT, " ".join(messages) or None),
            dbc.Card(dbc.CardBody([prompts, controls]), class_name="mb-3"),
            tabs,
        ]
    )


# --- Comparing -------------------------------------------------------------------------------


def open_pair(data: dict) -> tuple[analysis.PromptAnalysis, analysis.PromptAnalysis]:
    """The cached analyses a store entry names (cache hits; recomputed if evicted)."""
    return analysis.analyze(data["prompt_a"], data["model"]), analysis.analyze(
        data["prompt_b"], data["model"]
    )


def _options(count: int, prefix: str) -> list[dict]:
    return [{"label": f"{prefix}{index}", "value": str(index)} for index in range(count)]


def _clamp(value: int | None, count: int, name: str, messages: list[str]) -> int:
    if value is None:
        return 0
    if value >= count:
        messages.append(f"{name} {value} does not exist (0–{count - 1}); showing {name} 0")
        return 0
    return value


def _trigger() -> object:
    """The id that triggered the running callback; None when called as a plain function."""
    try:
        return ctx.triggered_id
    except MissingCallbackContextException:
        return None


@callback(
    Output(COMPARED, "data"),
    Output(LAYER, "options"),
    Output(LAYER, "value"),
    Output(HEAD, "options"),
    Output(HEAD, "value"),
    Output(STRIP_A, "children"),
    Output(STRIP_B, "children"),
    Output(TOKEN, "data"),
    Output(ALERT, "children"),
    Output(ALERT, "is_open"),
    Output(MODEL, "value"),
    Input(RUN, "n_clicks"),
    Input(ALIGN, "value"),
    State(PROMPT_A, "value"),
    State(PROMPT_B, "value"),
    State(MODEL, "value"),
    State(LAYER, "value"),
    State(HEAD, "value"),
    State(REQUEST, "data"),
)
def compare(n_clicks, align, prompt_a, prompt_b, model, layer, head, request):
    """Analyse both prompts (cache hits when seen before) and align their tokens.

    On page load (no click yet) it compares what the link asks for, or the example pair.
    """
    first_load = not n_clicks and _trigger() != ALIGN
    messages = list((request or {}).get("messages", [])) if first_load else []
    if first_load:
        model = usable_model(model, get_settings().default_model, messages)
    if align not in ALIGN_MODES:
        align = "end"

    # Both analyses, refused as one message naming the prompt at fault.
    analyses = []
    for name, prompt in (("A", prompt_a), ("B", prompt_b)):
        try:
            analyses.append(analysis.analyze(prompt, model))
        except ValueError as exc:
            logger.info("comparison refused (prompt %s): %s", name, exc)
            messages.append(f"Prompt {name}: {exc}")
    if len(analyses) < 2:
        return (*[no_update] * 8, *alert_update(" ".join(messages)), model)
    pa_a, pa_b = analyses

    layer = _clamp(as_index(layer), pa_a.n_layers, "layer", messages)
    head = _clamp(as_index(head), pa_a.n_heads, "head", messages)
    pairs = align_tokens(pa_a.str_tokens, pa_b.str_tokens, align)
    data = {
        "model": model,
        "prompt_a": prompt_a,
        "prompt_b": prompt_b,
        "align": align,
        "n_layers": pa_a.n_layers,
        "n_heads": pa_a.n_heads,
        "n_pos_a": pa_a.n_pos,
        "n_pos_b": pa_b.n_pos,
        "pairs": [[int(i), int(j)] for i, j in pairs],
    }
    if not first_load:  # asked for, not the link or example the page opened on
        search = compare_search(data, layer, head, "pair")
        remember_view("/compare", search, model, prompt_a, {"prompt_b": prompt_b, "align": align})
    return (
        data,
        _options(pa_a.n_layers, "L"),
        str(layer),
        _options(pa_a.n_heads, "H"),
        str(head),
        make_token_strip(pa_a.str_tokens, token_type=CHIP_A),
        make_token_strip(pa_b.str_tokens, token_type=CHIP_B),
        None,
        *alert_update(" ".join(messages) or None),
        model,
    )


def comparison_caption(data: dict, layer: int, head: int) -> str:
    """One plain-language line on what the difference views show."""
    n_a, n_b, n_pairs = data["n_pos_a"], data["n_pos_b"], len(data["pairs"])
    if data["align"] == "end" and n_a == n_b:
        how = f"position by position ({n_pairs} of {n_a} paired)"
    else:
        how = f"aligned {ALIGN_TITLES[data['align']]}"
        if n_a == n_b:
            how += f" ({n_pairs} of {n_a} paired)"
        else:
            how += f" ({n_pairs} paired; A has {n_a} tokens, B {n_b})"
    return f"A − B on {data['model']}, layer {layer} head {head}, {how}"


def _selection(data: dict | None, layer: object, head: object) -> tuple[int, int] | None:
    """``(layer, head)`` when both are valid for the comparison in ``data``."""
    layer, head = as_index(layer), as_index(head)
    if not data or layer is None or head is None:
        return None
    if layer >= data["n_layers"] or head >= data["n_heads"]:
        return None
    return layer, head


def selected_positions(
    data: dict | None, token: dict | None
) -> tuple[int | None, int | None, int | None]:
    """``(position in A, position in B, pair index)`` of the selected token and its partner.

    A token without a partner under the alignment is selected on its own side only.
    """
    if not data or not isinstance(token, dict) or token.get("side") not in ("a", "b"):
        return None, None, None
    side, pos = token["side"], as_index(token.get("pos"))
    if pos is None or pos >= data["n_pos_a" if side == "a" else "n_pos_b"]:
        return None, None, None
    column = 0 if side == "a" else 1
    pair = next((n for n, p in enumerate(data["pairs"]) if p[column] == pos), None)
    partner = None if pair is None else data["pairs"][pair][1 - column]
    return (pos, partner, pair) if side == "a" else (partner, pos, pair)


def _with_row(figure, position: int | None, n_pos: int, dark: bool):
    """``figure`` (an attention heatmap) with the query row of ``position`` framed."""
    if position is not None:
        row = block_index(position, n_pos, MAX_HEAD_SIDE)
        figure["layout"]["shapes"] = [highlight_shape("y", row, dark=dark)]
    return figure


@callback(
    Output(ATTN_A, "figure"),
    Output(ATTN_B, "figure"),
    Output(ATTN_DIFF, "figure"),
    Output(CAPTION, "children"),
    Input(COMPARED, "data"),
    Input(LAYER, "value"),
    Input(HEAD, "value"),
    Input(TOKEN, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
)
def show_attention(data, layer, head, token, dark):
    """The chosen head's attention on A and on B, and A − B over the aligned tokens."""
    dark = bool(dark)
    if not data:
        empty = make_empty_figure("Compare two prompts to see this view.", dark=dark)
        return empty, empty, empty, ""
    selected = _selection(data, layer, head)
    if selected is None:
        return no_update, no_update, no_update, no_update
    layer, head = selected

    pa_a, pa_b = open_pair(data)
    pos_a, pos_b, pair = selected_positions(data, token)
    where = f"L{layer} H{head}"
    figures = []
    for name, pa, pos in (("A", pa_a, pos_a), ("B", pa_b, pos_b)):
        figure = make_attention_heatmap(
            pa.attention(layer)[head],
            pa.str_tokens,
            title=f"{name} · {where}",
            dark=dark,
            height=FIGURE_HEIGHT,
        )
        figures.append(_with_row(figure, pos, pa.n_pos, dark))

    pairs = [tuple(p) for p in data["pairs"]]
    if pairs:
        difference = attention_difference(pa_a, pa_b, layer, pairs)[head]  # [n_pairs, n_pairs]
        figures.append(
            make_attention_difference(
                difference,
                pair_axis_labels(pa_a.str_tokens, pa_b.str_tokens, pairs),
                title=f"A − B · {where}",
                dark=dark,
                height=FIGURE_HEIGHT,
                selected_pair=pair,
            )
        )
    else:
        message = "No tokens pair up under this alignment: try by position from the end."
        figures.append(make_empty_figure(message, dark=dark, height=FIGURE_HEIGHT))
    return *figures, comparison_caption(data, layer, head)


def _stage_labels(n_layers: int) -> tuple[list[str], list[str]]:
    """Row labels of a retention heatmap: the stream entering each layer, then the output."""
    names = [f"into L{layer}" for layer in range(n_layers)] + ["output"]
    return names, names


@callback(
    Output(RET_A, "figure"),
    Output(RET_B, "figure"),
    Output(RET_DIFF, "figure"),
    Input(COMPARED, "data"),
    Input(RET_MEASURE, "value"),
    Input(TOKEN, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
)
def show_retention(data, measure, token, dark):
    """Per layer and token, how much of each token's identity survives, on A, B and A − B."""
    dark = bool(dark)
    if not data:
        empty = make_empty_figure("Compare two prompts to see this view.", dark=dark)
        return empty, empty, empty
    measure = measure if measure in RETENTION_TITLES else "cosine"

    pa_a, pa_b = open_pair(data)
    pairs = [tuple(p) for p in data["pairs"]]
    if measure == "cosine":
        values = [embedding_cosine(pa_a), embedding_cosine(pa_b)]  # [n_layers + 1, pos] each
        zrange, signed, unit = (-1.0, 1.0), True, "cosine"
    else:
        values = [resid_norms(pa_a), resid_norms(pa_b)]
        zrange, signed, unit = (0.0, symmetric_range(*values)), False, "norm"
    stages = _stage_labels(pa_a.n_layers)
    pos_a, pos_b, pair = selected_positions(data, token)
    title = RETENTION_SHORT[measure]
    height = 160 + 34 * (pa_a.n_layers + 1)

    figures = []
    for name, pa, value, pos in (("A", pa_a, values[0], pos_a), ("B", pa_b, values[1], pos_b)):
        figures.append(
            make_value_heatmap(
                value,
                token_axis_labels(pa.str_tokens),
                stages,
                title=f"{name} · {title}",
                x_title="token",
                y_title="stream",
                signed=signed,
                zrange=zrange,
                colorbar_title=unit,
                value_name=unit,
                dark=dark,
                height=height,
                shapes=[] if pos is None else [highlight_shape("x", pos, dark=dark)],
            )
        )
    if not pairs:
        message = "No tokens pair up under this alignment: try by position from the end."
        figures.append(make_empty_figure(message, dark=dark, height=height))
        return figures
    difference = (
        embedding_cosine_difference(pa_a, pa_b, pairs)
        if measure == "cosine"
        else residual_norm_difference(pa_a, pa_b, pairs)
    )  # [n_layers + 1, n_pairs]
    figures.append(
        make_value_heatmap(
            difference,
            pair_axis_labels(pa_a.str_tokens, pa_b.str_tokens, pairs),
            stages,
            title=f"A − B · {title}",
            x_title="aligned token",
            y_title="stream",
            signed=True,
            colorbar_title="A − B",
            value_name=f"{unit} A − B",
            dark=dark,
            height=height,
            shapes=[] if pair is None else [highlight_shape("x", pair, dark=dark)],
        )
    )
    return figures


def report_inputs(data, layer, head, token, measure, dark) -> FigureReport:
    """The side-by-side views as they are on screen, for a report bundle."""
    if not data:
        raise ValueError("compare two prompts first")
    selected = _selection(data, layer, head)
    if selected is None:
        raise ValueError("choose a layer and a head first")
    layer, head = selected
    measure = measure if measure in RETENTION_TITLES else "cosine"

    *attention, caption = show_attention(data, layer, head, token, dark)
    retention = show_retention(data, measure, token, dark)
    names = (
        ("attention-a", f"Attention on A, L{layer} H{head}"),
        ("attention-b", f"Attention on B, L{layer} H{head}"),
        ("attention-a-minus-b", f"Attention A − B, L{layer} H{head}"),
        ("retention-a", f"Retention on A ({RETENTION_SHORT[measure]})"),
        ("retention-b", f"Retention on B ({RETENTION_SHORT[measure]})"),
        ("retention-a-minus-b", f"Retention A − B ({RETENTION_SHORT[measure]})"),
    )
    figures = tuple(
        ReportFigure(name, title, figure)
        for (name, title), figure in zip(names, [*attention, *retention], strict=True)
        if figure["data"]  # no tokens paired: the difference view is only a message
    )

    pa_a, _ = open_pair(data)
    options = {
        "layer": layer,
        "head": head,
        "token": token,
        "align": data.get("align"),
        "retention_measure": measure,
    }
    return FigureReport(
        model_id=data["model"],
        fingerprint=str(pa_a.meta.get("fingerprint", "")),
        prompts=(data["prompt_a"], data["prompt_b"]),
        figures=figures,
        options=options,
        facts=(("Compared", caption), ("Tokens paired", str(len(data["pairs"])))),
        prompt_labels=("Prompt A (clean)", "Prompt B (corrupted)"),
    )


register_report_download(
    REPORT,
    [
        State(COMPARED, "data"),
        State(LAYER, "value"),
        State(HEAD, "value"),
        State(TOKEN, "data"),
        State(RET_MEASURE, "value"),
        State(COLOR_MODE_SWITCH, "value"),
    ],
    report_inputs,
)


# --- Token selection, URL and tabs -----------------------------------------------------------


def token_from_heatmap_click(click_data: dict | None) -> int | None:
    """The query position of a click on an attention heatmap (first position of a block)."""
    try:
        label = click_data["points"][0]["y"]  # type: ignore[index]
        return int(label.split(" ", 1)[0].split("–", 1)[0])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


@callback(
    Output(TOKEN, "data", allow_duplicate=True),
    Input({"type": CHIP_A, "index": ALL}, "n_clicks"),
    Input({"type": CHIP_B, "index": ALL}, "n_clicks"),
    Input(ATTN_A, "clickData"),
    Input(ATTN_B, "clickData"),
    prevent_initial_call=True,
)
def choose_token(_clicks_a, _clicks_b, click_a, click_b):
    """A click on a token chip, or on a query row of A's or B's heatmap, selects that token."""
    trigger = ctx.triggered_id
    if trigger in (ATTN_A, ATTN_B):
        pos = token_from_heatmap_click(click_a if trigger == ATTN_A else click_b)
        side = "a" if trigger == ATTN_A else "b"
    elif isinstance(trigger, dict) and ctx.triggered[0].get("value"):
        pos, side = trigger["index"], "a" if trigger["type"] == CHIP_A else "b"
    else:
        return no_update  # a freshly drawn strip, not a click
    return no_update if pos is None else {"side": side, "pos": pos}


@callback(
    Output({"type": CHIP_A, "index": ALL}, "className"),
    Output({"type": CHIP_B, "index": ALL}, "className"),
    Input(TOKEN, "data"),
    State(COMPARED, "data"),
    State({"type": CHIP_A, "index": ALL}, "id"),
    State({"type": CHIP_B, "index": ALL}, "id"),
)
def mark_tokens(token, data, ids_a, ids_b):
    """Highlight the selected token and its partner in the other prompt."""
    pos_a, pos_b, _ = selected_positions(data, token)
    return (
        [SELECTED_TOKEN_CLASS if i["index"] == pos_a else TOKEN_CLASS for i in ids_a],
        [SELECTED_TOKEN_CLASS if i["index"] == pos_b else TOKEN_CLASS for i in ids_b],
    )


@callback(
    Output(URL, "search"),
    Input(COMPARED, "data"),
    Input(LAYER, "value"),
    Input(HEAD, "value"),
    Input(TABS, "active_tab"),
    prevent_initial_call=True,
)
def sync_url(data, layer, head, tab):
    """Keep the address bar on a link that reopens this view."""
    return compare_search(data, layer, head, tab) or no_update


# The two prompts, the alignment and the Compare button mean nothing to a prompt set.
clientside_callback(
    """
    function(tab) {
        return [tab === 'set', tab === 'set'];
    }
    """,
    Output(PAIR_INPUTS, "hidden"),
    Output(PAIR_CONTROLS, "hidden"),
    Input(TABS, "active_tab"),
)
