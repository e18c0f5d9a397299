"""Ablate: knock out heads, attention layers or MLP layers and see which memories break.

The Ablate button runs one intervention (``analysis.ablation.ablate``: a clean and an ablated
forward pass, cached) and shows the per-token loss before and after, Δloss, the top prediction
before and after, and the tokens whose prediction broke, outlined red in the token strip. The
downstream-attention card shows how far each later head's attention moved (a layer × head map);
clicking a head shows its pattern before, after and the change. Run sweep ablates every head,
attention layer and MLP layer one at a time in a background job (progress bar, Cancel) and shows
Δ mean loss as a layer × head heatmap; clicking tokens in the strip chooses the tokens whose
Δloss the last heatmap averages (a cache read, no forward pass).
The URL carries the model, prompt, components, positions, method, resample source and the
reference prompts of a mean over a reference set.
"""

# No ``from __future__ import annotations``: Dash runs page modules before listing them in
# sys.modules (see pages/attention.py).
import logging
import re
from urllib.parse import urlencode

import dash_bootstrap_components as dbc
import numpy as np
from dash import (
    ALL,
    Input,
    Output,
    State,
    callback,
    ctx,
    dcc,
    html,
    no_update,
    register_page,
)

import analysis
from analysis.ablation import (
    MAX_REFERENCE_PROMPTS,
    AblationCancelled,
    Component,
    ablate,
    ablation_sweep,
)
from analysis.settings import get_settings
from components.ablation import (
    ablate_token_class,
    change_grid,
    make_ablate_token_strip,
    make_attention_change_heatmap,
    make_delta_loss_figure,
    make_layer_sweep_heatmap,
    make_loss_figure,
    make_pattern_comparison,
    make_prediction_table,
    make_sweep_heatmap,
    parse_change_click,
    prediction_rows,
)
from components.alerts import alert_update, make_error_alert
from components.download import (
    ReportDownloadIds,
    make_figure_download,
    make_report_download,
    register_report_download,
)
from components.export import FigureReport, ReportFigure
from components.heatmaps import make_empty_figure
from components.jobs import limited_job
from components.prompt_panel import (
    DEFAULT_PROMPT,
    PromptPanelIds,
    make_prompt_panel,
    register_example_callback,
)
from components.shell import COLOR_MODE_SWITCH, LAST_ANALYSIS_STORE, make_card
from components.url_state import QueryReader

register_page(
    __name__,
    path="/ablate",
    name="Ablate",
    title="MemLens · Ablate",
    description="Knock out heads or layers and see which token memories break.",
    order=6,
)
logger = logging.getLogger(__name__)

# Component ids, declared once.
PAGE = "ablate"
PANEL = PromptPanelIds(PAGE)
ALERT = "ablate-alert"
URL = "ablate-url"
LINK_NOTES = "ablate-link-notes"  # what the link asked for that the page could not use
ANALYSIS = "ablate-analysis"
FAILURES = "ablate-failures"
CHOSEN = "ablate-chosen"
COMPONENTS = "ablate-components"
POSITIONS = "ablate-positions"
METHOD = "ablate-method"
SOURCE = "ablate-source"
SOURCE_BOX = "ablate-source-box"
REFERENCES = "ablate-references"
REFERENCES_BOX = "ablate-references-box"
ABLATION = "ablate-ablation"
ATTN_CHANGE = "ablate-attention-change"
ATTN_HEAD = "ablate-attention-head"
ATTN_SELECTED = "ablate-attention-selected"
RUN = "ablate-run"
STRIP = "ablate-token-strip"
TOKEN_CHIP = "ablate-token"
SUMMARY = "ablate-summary"
LOSS = "ablate-loss"
DELTA = "ablate-delta"
TABLE = "ablate-table"
SWEEP_ALERT = "ablate-sweep-alert"
SWEEP_RUN = "ablate-sweep-run"
SWEEP_CANCEL = "ablate-sweep-cancel"
SWEEP_PROGRESS = "ablate-sweep-progress"
SWEEP = "ablate-sweep"
SWEEP_HEADS = "ablate-sweep-heads"
SWEEP_LAYERS = "ablate-sweep-layers"
SWEEP_SELECTED = "ablate-sweep-selected"
REPORT = ReportDownloadIds(PAGE)

# The page's methods; "reference" is the analysis's "mean" with reference prompts.
METHOD_TITLES = {
    "zero": "zero",
    "mean": "mean over the prompt",
    "reference": "mean over reference prompts",
    "resample": "resample from another prompt",
}
_COMPONENT = re.compile(r"^L(\d+)\s*(?:H(\d+)|(attn|mlp))$", re.IGNORECASE)
_GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": "hover"}


# --- Parsing what the user typed or linked ------------------------------------------------------


def parse_component(text: str, positions: tuple[int, ...] | None = None) -> Component:
    """``"L1H2"`` (a head), ``"L1attn"`` (attention layer) or ``"L1mlp"`` as a Component."""
    match = _COMPONENT.match(str(text).strip())
    if not match:
        raise ValueError(
            f"{str(text)[:40]!r} is not a component: write L<layer>H<head> (e.g. L1H2), "
            "L<layer>attn or L<layer>mlp"
        )
    layer, head, kind = match.groups()
    if head is not None:
        return Component("head", int(layer), int(head), positions)
    return Component(kind.lower(), int(layer), None, positions)


def component_value(component: Component) -> str:
    """The menu value and URL word of a component (``L1H2``, ``L1attn``, ``L1mlp``)."""
    if component.kind == "head":
        return f"L{component.layer}H{component.head}"
    return f"L{component.layer}{component.kind}"


def component_options(n_layers: int, n_heads: int) -> list[dict]:
    """Every head, attention layer and MLP layer of the model, layer by layer."""
    options = []
    for layer in range(n_layers):
        options += [{"label": f"L{layer}H{h}", "value": f"L{layer}H{h}"} for h in range(n_heads)]
        options.append({"label": f"L{layer} attn (whole layer)", "value": f"L{layer}attn"})
        options.append({"label": f"L{layer} MLP", "value": f"L{layer}mlp"})
    return options


def parse_positions(text: str | None) -> tuple[int, ...] | None:
    """``"3, 5-7"`` as ``(3, 5, 6, 7)``; empty text means every position (None)."""
    if text is None or not str(text).strip():
        return None
    positions: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(
                f"positions {part[:20]!r} is not a number or a range: write e.g. 3, 5-7"
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first:
            raise ValueError(f"positions {part!r} runs backwards: write {last}-{first}")
        positions.update(range(first, last + 1))
    return tuple(sorted(positions)) or None


def parse_references(text: str | None) -> tuple[str, ...]:
    """The reference prompts typed one per line (blank lines skipped), for the mean ablation."""
    references = tuple(line.strip() for line in str(text or "").splitlines() if line.strip())
    if not references:
        raise ValueError(
            "mean over reference prompts needs some: type one prompt per line in the box "
            "under the methods"
        )
    if len(references) > MAX_REFERENCE_PROMPTS:
        raise ValueError(
            f"{len(references)} reference prompts is too many: the mean runs the model once per "
            f"prompt, so keep at most {MAX_REFERENCE_PROMPTS} lines"
        )
    return references


def method_arguments(method: object, source: str | None, references: str | None) -> dict:
    """The page's method as :func:`analysis.ablation.ablate` arguments; ValueError naming what
    is missing."""
    if method not in METHOD_TITLES:
        raise ValueError(f"choose a method: {', '.join(METHOD_TITLES.values())}")
    if method == "resample" and not (source or "").strip():
        raise ValueError(
            "resample needs a source prompt: type one with as many tokens as the prompt"
        )
    return {
        "method": "mean" if method == "reference" else method,
        "source_prompt": source if method == "resample" else None,
        "reference_prompts": list(parse_references(references)) if method == "reference" else None,
    }


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [word for word in value.split(",") if word.strip()]
    return [str(word) for word in value]  # type: ignore[union-attr]


def parse_query(query: dict) -> dict:
    """The page state a link asks for; anything missing falls back to the defaults."""
    read = QueryReader(query)
    method = read.choice("method", METHOD_TITLES, "zero")
    state = {
        "model": read.text("model") or get_settings().default_model,
        "prompt": read.text("prompt") or DEFAULT_PROMPT,
        "components": _as_list(read.text("components")),
        "positions": read.text("positions") or "",
        "method": method,
        "source": read.text("source") or "",
        "references": read.text("references") or "",
    }
    return {**state, "messages": read.messages}


def page_search(model, prompt, components, positions, method, source, references="") -> str:
    """The query string that reopens this ablation."""
    params = {"model": model, "prompt": prompt, "method": method}
    if components:
        params["components"] = ",".join(components)
    if positions:
        params["positions"] = positions
    if method == "resample" and source:
        params["source"] = source
    if method == "reference" and references:
        params["references"] = references
    return "?" + urlencode(params)


# --- Layout ------------------------------------------------------------------------------------


# The downstream views before any ablation: one height, so both download bars line up.
_DOWNSTREAM_EMPTY = 260
_CHANGE_WAITS = "Ablate to see which heads moved."
_HEAD_WAITS = "Then click a head."


def _graph(graph_id: str, message: str, height: int = 300) -> html.Div:
    figure = make_empty_figure(message, height=height)
    graph = dcc.Loading(
        dcc.Graph(id=graph_id, figure=figure, config=_GRAPH_CONFIG), delay_show=400, type="circle"
    )
    return html.Div([graph, make_figure_download(graph_id)])


def _hint(text: str) -> html.Small:
    return html.Small(text, className="text-body-secondary")


def _controls(state: dict) -> html.Div:
    """Components, positions, method, resample source and the Ablate button."""
    return html.Div(
        [
            dcc.Dropdown(
                id=COMPONENTS,
                options=[{"label": v, "value": v} for v in state["components"]],
                value=state["components"],
                multi=True,
                placeholder="Heads (L1H2), attention layers or MLP layers to ablate together",
                className="mb-2",
            ),
            dbc.InputGroup(
                [
                    dbc.InputGroupText("Positions"),
                    dbc.Input(
                        id=POSITIONS,
                        value=state["positions"],
                        placeholder="all (or e.g. 3, 5-7)",
                    ),
                ],
                size="sm",
                class_name="mb-2",
            ),
            dbc.RadioItems(
                id=METHOD,
                options=[{"label": t, "value": m} for m, t in METHOD_TITLES.items()],
                value=state["method"],
                inline=True,
                class_name="small mb-2",
            ),
            html.Div(
                dbc.Textarea(
                    id=SOURCE,
                    value=state["source"],
                    rows=2,
                    placeholder="Resample source: a prompt with as many tokens as the one on "
                    "the left",
                    class_name="font-monospace small mb-2",
                    spellcheck=False,
                ),
                id=SOURCE_BOX,
                hidden=state["method"] != "resample",
            ),
            html.Div(
                dbc.Textarea(
                    id=REFERENCES,
                    value=state["references"],
                    rows=3,
                    placeholder="Reference prompts, one per line: the mean is taken over every "
                    f"token of them (at most {MAX_REFERENCE_PROMPTS})",
                    class_name="font-monospace small mb-2",
                    spellcheck=False,
                ),
                id=REFERENCES_BOX,
                hidden=state["method"] != "reference",
            ),
            dbc.Button("Ablate", id=RUN, color="primary", n_clicks=0),
        ]
    )


def layout(**query) -> html.Div:
    """The page for a URL's query parameters; works with none."""
    state = parse_query(query)
    panel = make_prompt_panel(
        PANEL, models=analysis.available_models(), model=state["model"], prompt=state["prompt"]
    )
    sweep_buttons = html.Div(
        [
            dbc.Button("Run sweep", id=SWEEP_RUN, color="primary", n_clicks=0),
            dbc.Button("Cancel", id=SWEEP_CANCEL, color="secondary", outline=True, disabled=True),
            dbc.Progress(id=SWEEP_PROGRESS, value=0, max=1, striped=True, class_name="flex-grow-1"),
        ],
        className="d-flex gap-2 align-items-center mb-3",
    )
    sweep = make_card(
        "Ablation sweep: one component at a time",
        [
            make_error_alert(SWEEP_ALERT),
            sweep_buttons,
            dbc.Row(
                [
                    dbc.Col(_graph(SWEEP_HEADS, "Run the sweep to see every head.", 220), lg=5),
                    dbc.Col(_graph(SWEEP_LAYERS, "…and every layer.", 220), lg=3),
                    dbc.Col(
                        _graph(SWEEP_SELECTED, "Click tokens in the strip to choose them.", 220),
                        lg=4,
                    ),
                ]
            ),
        ],
        extra=_hint("Same method and positions as above; each ablation alone"),
    )
    return html.Div(
        [
            dcc.Location(id=URL, refresh=False),
            dcc.Store(id=ANALYSIS),
            dcc.Store(id=FAILURES, data=[]),
            dcc.Store(id=CHOSEN, data=[]),
            dcc.Store(id=SWEEP),
            dcc.Store(id=ABLATION),
            dcc.Store(id=ATTN_SELECTED),
            dcc.Store(id=LINK_NOTES, data=state["messages"]),
            make_error_alert(ALERT),
            dbc.Row(
                [
                    dbc.Col(panel, lg=5, class_name="mb-3"),
                    dbc.Col(make_card("Ablate", _controls(state), class_name="h-100"), lg=7),
                ]
            ),
            make_card(
                "Tokens",
                [
                    dcc.Loading(html.Div(id=STRIP), delay_show=400),
                    html.Div(id=SUMMARY, className="small mt-2"),
                ],
                extra=html.Div(
                    [
                        _hint(
                            "Red: prediction broke. Click tokens to choose them for the sweep. "
                            "· is a space."
                        ),
                        make_report_download(REPORT),
                    ],
                    className="d-flex flex-wrap gap-3 align-items-center",
                ),
            ),
            dbc.Row(
                [
                    dbc.Col(
                        make_card(
                            "Loss before and after",
                            [
                                _graph(LOSS, "Ablate to compare."),
                                _graph(DELTA, "", height=240),
                            ],
                        ),
                        xl=7,
                    ),
                    dbc.Col(
                        make_card(
                            "Top prediction",
                            html.Div(id=TABLE),
                            extra=_hint("Probabilities in brackets"),
                        ),
                        xl=5,
                    ),
                ]
            ),
            make_card(
                "Downstream attention: what the ablation changed",
                dbc.Row(
                    [
                        dbc.Col(_graph(ATTN_CHANGE, _CHANGE_WAITS, _DOWNSTREAM_EMPTY), lg=4),
                        dbc.Col(_graph(ATTN_HEAD, _HEAD_WAITS, _DOWNSTREAM_EMPTY), lg=8),
                    ]
                ),
                extra=_hint(
                    "Mean total-variation distance of each query's attention; click a head "
                    "for its pattern before and after"
                ),
            ),
            sweep,
        ]
    )


# --- Callbacks ---------------------------------------------------------------------------------

register_example_callback(PANEL)


def summary_text(result, model: str, method: str | None = None) -> str:
    """One plain-text line on what was ablated and what it did (``method``: the page's)."""
    if not result.components:
        return (
            f"Nothing is ablated yet on {model}: mean loss "
            f"{float(np.mean(result.loss_before)):.3f}. Choose heads or layers above and press "
            "Ablate."
        )
    what = ", ".join(c.label for c in result.components)
    failures = result.failure_tokens
    return (
        f"Ablated {what} ({METHOD_TITLES[method or result.method]}) on {model}: mean loss "
        f"{float(np.mean(result.loss_before)):.3f} → {float(np.mean(result.loss_after)):.3f} "
        f"(Δ {result.delta_mean_loss:+.3f}); {len(failures)} memory failure"
        f"{'' if len(failures) == 1 else 's'}"
        + (
            f" at positions {', '.join(str(int(p)) for p in failures[:20])}"
            if len(failures)
            else ""
        )
        + "."
    )


@callback(
    Output(ANALYSIS, "data"),
    Output(COMPONENTS, "options"),
    Output(STRIP, "children"),
    Output(FAILURES, "data"),
    Output(CHOSEN, "data"),
    Output(SUMMARY, "children"),
    Output(LOSS, "figure"),
    Output(DELTA, "figure"),
    Output(TABLE, "children"),
    Output(ALERT, "children"),
    Output(ALERT, "is_open"),
    Output(URL, "search"),
    Output(LAST_ANALYSIS_STORE, "data"),
    Output(ABLATION, "data"),
    Input(PANEL.analyse, "n_clicks"),
    Input(RUN, "n_clicks"),
    # State, not Input: this callback also writes the app-wide last-analysis store, and an
    # app-wide Input on top would make Dash fire it on pages without the Ablate layout.
    State(COLOR_MODE_SWITCH, "value"),
    State(PANEL.prompt, "value"),
    State(PANEL.model, "value"),
    State(COMPONENTS, "value"),
    State(POSITIONS, "value"),
    State(METHOD, "value"),
    State(SOURCE, "value"),
    State(CHOSEN, "data"),
    State(REFERENCES, "value"),
    State(LINK_NOTES, "data"),
)
def run_ablation(
    analyse_clicks,
    run_clicks,
    dark,
    prompt,
    model,
    components,
    positions,
    method,
    source,
    chosen,
    references=None,
    link_notes=None,
):
    """Analyse the prompt and ablate the chosen components: loss, Δloss, predictions, failures.

    The page's first run (no click yet) also shows what its link asked for that it could not
    use; later runs close the alert."""
    dark = bool(dark)

    def refuse(message: str):
        logger.info("ablation refused: %s", message)
        return (*[no_update] * 9, *alert_update(message), *[no_update] * 3)

    # Read the user's choices, then the prompt (a cache hit when analysed before).
    try:
        pa = analysis.analyze(prompt, model)
        at = parse_positions(positions)
        chosen_components = [parse_component(text, at) for text in _as_list(components)]
        for component in chosen_components:
            component.check(pa.n_layers, pa.n_heads, pa.n_pos)
        arguments = method_arguments(method, source, references)
        result = ablate(pa, chosen_components, **arguments)
    except (ValueError, AblationCancelled) as exc:
        return refuse(str(exc))

    # Shape the output.
    chosen = [p for p in (chosen or []) if isinstance(p, int) and 0 < p < pa.n_pos]
    failures = [int(p) for p in result.failure_tokens]
    str_tokens = list(pa.str_tokens)
    data = {
        "model": model,
        "prompt": prompt,
        "n_layers": pa.n_layers,
        "n_heads": pa.n_heads,
        "n_pos": pa.n_pos,
    }
    rows = prediction_rows(
        str_tokens,
        result.top_str_before,
        result.top_str_after,
        result.top_prob_before,
        result.top_prob_after,
        result.failures,
    )
    words = [component_value(c) for c in chosen_components]
    return (
        data,
        component_options(pa.n_layers, pa.n_heads),
        make_ablate_token_strip(
            str_tokens, token_type=TOKEN_CHIP, failures=failures, chosen=chosen
        ),
        failures,
        chosen,
        summary_text(result, model, method),
        make_loss_figure(
            str_tokens, result.loss_before, result.loss_after, result.failures, dark=dark
        ),
        make_delta_loss_figure(str_tokens, result.delta_loss, title="Δloss", dark=dark),
        make_prediction_table(rows),
        *alert_update(None if analyse_clicks or run_clicks else " ".join(link_notes or [])),
        page_search(
            model, prompt, words, (positions or "").strip(), method, source, references or ""
        ),
        {"model": model, "prompt": prompt},
        {
            "model": model,
            "prompt": prompt,
            "components": [c.to_key() for c in chosen_components],
            **arguments,
        },
    )


@callback(
    Output(SOURCE_BOX, "hidden"),
    Output(REFERENCES_BOX, "hidden"),
    Input(METHOD, "value"),
)
def show_method_inputs(method):
    """The resample source box for resample, the reference prompts box for the reference mean."""
    return method != "resample", method != "reference"


def _open_ablation(request: dict):
    """The ablation a run stored (a cache read, no forward pass) and its prompt's tokens."""
    pa = analysis.analyze(request["prompt"], request["model"])
    components = [Component.from_key(key) for key in request["components"]]
    return ablate(
        pa,
        components,
        method=request["method"],
        source_prompt=request["source_prompt"],
        reference_prompts=request["reference_prompts"],
    )


@callback(
    Output(ATTN_CHANGE, "figure"),
    Output(ATTN_HEAD, "figure"),
    Output(ATTN_SELECTED, "data"),
    Input(ABLATION, "data"),
    Input(ATTN_CHANGE, "clickData"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(ATTN_SELECTED, "data"),
    State(ANALYSIS, "data"),
    prevent_initial_call=True,
)
def show_downstream_attention(request, click, dark, selected, data):
    """Layer × head map of how far attention moved; the chosen head before, after and Δ."""
    dark = bool(dark)
    if not request:
        return _before_any_ablation(dark)
    try:
        result = _open_ablation(request)
    except (ValueError, AblationCancelled) as exc:
        return make_empty_figure(str(exc), dark=dark), no_update, None

    # A click picks a head; a new ablation picks the head that moved most.
    picked = parse_change_click(click) if ctx.triggered_id == ATTN_CHANGE else None
    if picked is None and ctx.triggered_id != ABLATION and selected:
        picked = tuple(selected)
    n_layers = (data or {}).get("n_layers")
    heatmap, patterns, picked = downstream_figures(result, picked, n_layers, dark)
    return heatmap, patterns, None if picked is None else list(picked)


def _before_any_ablation(dark: bool):
    """The downstream views' placeholders, in :func:`downstream_figures`' shape."""
    return (
        make_empty_figure(_CHANGE_WAITS, dark=dark, height=_DOWNSTREAM_EMPTY),
        make_empty_figure(_HEAD_WAITS, dark=dark, height=_DOWNSTREAM_EMPTY),
        None,
    )


def downstream_figures(result, picked, n_layers: int | None, dark: bool):
    """``(change heatmap, pattern comparison, (layer, head) shown)``; ``picked`` None or not
    downstream means the head whose attention moved most."""
    if not result.components:  # the page's first analysis: nothing is ablated yet
        return _before_any_ablation(dark)
    layers = result.attention_layers
    change = result.attention_change()
    n_layers = n_layers or (max(layers, default=0) + 1)
    if picked is None or picked[0] not in layers:
        picked = None
        if layers:
            row, head = np.unravel_index(int(np.argmax(change)), change.shape)
            picked = (layers[int(row)], int(head))

    grid = change_grid(change, layers, int(n_layers))
    heatmap = make_attention_change_heatmap(
        grid, selected=picked, title="attention moved, per head", dark=dark
    )
    if picked is None:
        last = max(c.layer for c in result.components)
        message = f"No attention is downstream of layer {last}: it is the last layer."
        return heatmap, make_empty_figure(message, dark=dark, height=420), None
    layer, head = picked
    index = layers.index(layer)
    patterns = make_pattern_comparison(
        result.attention_before[index, head],
        result.attention_after[index, head],
        result.str_tokens,
        title=f"L{layer}H{head}: attention before and after the ablation",
        dark=dark,
    )
    return heatmap, patterns, (layer, head)


@callback(
    Output(CHOSEN, "data", allow_duplicate=True),
    Input({"type": TOKEN_CHIP, "index": ALL}, "n_clicks"),
    State(CHOSEN, "data"),
    prevent_initial_call=True,
)
def toggle_token(clicks, chosen):
    """Clicking a token adds it to (or removes it from) the sweep's chosen tokens."""
    if not isinstance(ctx.triggered_id, dict) or not any(clicks or []):
        return no_update
    position = int(ctx.triggered_id["index"])
    if position == 0:
        return no_update  # nothing predicts the first token, so it has no loss
    chosen = set(chosen or [])
    chosen ^= {position}
    return sorted(chosen)


@callback(
    Output({"type": TOKEN_CHIP, "index": ALL}, "className"),
    Input(CHOSEN, "data"),
    State(FAILURES, "data"),
    State({"type": TOKEN_CHIP, "index": ALL}, "id"),
)
def restyle_tokens(chosen, failures, chip_ids):
    """Chosen tokens filled, failed ones outlined red."""
    return [ablate_token_class(c["index"], failures or [], chosen or []) for c in chip_ids]


def _sweep_figures(sweep, dark: bool):
    """The head heatmap and the layer heatmap of a finished (or partial) sweep."""
    return (
        make_sweep_heatmap(sweep.head_delta, title="Δ mean loss, per head", dark=dark),
        make_layer_sweep_heatmap(sweep.attn_delta, sweep.mlp_delta, title="per layer", dark=dark),
    )


def _selected_figure(sweep, chosen: list[int], dark: bool):
    if not chosen:
        return make_empty_figure("Click tokens in the strip to choose them.", dark=dark, height=220)
    shown = ", ".join(str(p) for p in chosen[:8]) + ("…" if len(chosen) > 8 else "")
    return make_sweep_heatmap(
        sweep.with_selection(chosen).head_delta_selected,
        title=f"Δloss on tokens {shown}",
        value_name="Δloss of the chosen tokens",
        dark=dark,
    )


def _sweep_request(data: dict, method, source, positions, references=None) -> dict:
    """Checked arguments of a sweep, as primitives (they go in the SWEEP store)."""
    arguments = method_arguments(method, source, references)
    at = parse_positions(positions)
    return {
        "model": data["model"],
        "prompt": data["prompt"],
        "method": arguments["method"],
        "source": arguments["source_prompt"],
        "references": arguments["reference_prompts"],
        "positions": None if at is None else list(at),
    }


def _open_sweep(request: dict, chosen=None, progress=None, *, cached_only: bool = False):
    """The sweep a request names: from the cache, else computed (``cached_only``: else a
    ValueError, so that a view never starts a long job)."""
    pa = analysis.analyze(request["prompt"], request["model"])
    try:
        return ablation_sweep(
            pa,
            method=request["method"],
            source_prompt=request["source"],
            reference_prompts=request.get("references"),
            positions=request["positions"],
            selected_tokens=chosen or None,
            progress=progress,
            # Asked before the first pass: on a cache miss the sweep stops before any work.
            should_stop=(lambda: True) if cached_only else None,
        )
    except AblationCancelled:
        if not cached_only:
            raise
        raise ValueError("the sweep is no longer in the cache: run it again") from None


@callback(
    Output(SWEEP_HEADS, "figure"),
    Output(SWEEP_LAYERS, "figure"),
    Output(SWEEP_SELECTED, "figure", allow_duplicate=True),
    Output(SWEEP, "data"),
    Output(SWEEP_ALERT, "children"),
    Output(SWEEP_ALERT, "is_open"),
    Input(SWEEP_RUN, "n_clicks"),
    State(ANALYSIS, "data"),
    State(METHOD, "value"),
    State(SOURCE, "value"),
    State(POSITIONS, "value"),
    State(CHOSEN, "data"),
    State(COLOR_MODE_SWITCH, "value"),
    State(REFERENCES, "value"),
    background=True,
    progress=[
        Output(SWEEP_PROGRESS, "value"),
        Output(SWEEP_PROGRESS, "max"),
        Output(SWEEP_PROGRESS, "label"),
    ],
    progress_default=[0, 1, ""],
    running=[
        (Output(SWEEP_RUN, "disabled"), True, False),
        (Output(SWEEP_CANCEL, "disabled"), False, True),
    ],
    cancel=[Input(SWEEP_CANCEL, "n_clicks")],
    prevent_initial_call=True,
)
@limited_job(lambda message: (*[no_update] * 4, *alert_update(message)))
def run_sweep(
    set_progress, n_clicks, data, method, source, positions, chosen, dark, references=None
):
    """Ablate every head, attention layer and MLP layer alone; heatmaps of Δ mean loss."""
    dark = bool(dark)
    if not data:
        return *[no_update] * 4, *alert_update("Analyse a prompt first: the sweep runs on it.")
    try:
        request = _sweep_request(data, method, source, positions, references)
        sweep = _open_sweep(
            request,
            chosen,
            progress=lambda done, total: set_progress((done, total, f"{done}/{total}")),
        )
    except (ValueError, AblationCancelled) as exc:
        logger.info("sweep refused: %s", exc)
        return *[no_update] * 4, *alert_update(str(exc))
    heads, layers = _sweep_figures(sweep, dark)
    selected = _selected_figure(sweep, chosen or [], dark)
    return heads, layers, selected, request, *alert_update(None)


@callback(
    Output(SWEEP_SELECTED, "figure"),
    Input(CHOSEN, "data"),
    Input(COLOR_MODE_SWITCH, "value"),
    State(SWEEP, "data"),
    prevent_initial_call=True,
)
def show_selected(chosen, dark, request):
    """Δloss of the chosen tokens per head, from the cached sweep (no forward pass)."""
    dark = bool(dark)
    if not request:
        return make_empty_figure(
            "Run the sweep, then click tokens to choose them.", dark=dark, height=220
        )
    try:
        sweep = _open_sweep(request, cached_only=True)
        return _selected_figure(sweep, chosen or [], dark)
    except ValueError as exc:
        return make_empty_figure(str(exc), dark=dark)


# --- Report bundle ---------------------------------------------------------------------------


def report_inputs(request, sweep_request, chosen, picked, data, dark) -> FigureReport:
    """The ablation and the sweep as they are on screen, for a report bundle."""
    if not request and not sweep_request:
        raise ValueError("ablate something or run the sweep first")
    dark = bool(dark)
    chosen = [p for p in (chosen or []) if isinstance(p, int)]
    figures: list[ReportFigure] = []
    options: dict = {}
    prompt = model = None

    # The last ablation: loss before and after, Δloss, and the downstream attention.
    if request:
        result = _open_ablation(request)
        str_tokens = list(result.str_tokens)
        model, prompt = request["model"], request["prompt"]
        picked = tuple(picked) if isinstance(picked, list | tuple) and len(picked) == 2 else None
        heatmap, patterns, shown = downstream_figures(
            result, picked, (data or {}).get("n_layers"), dark
        )
        what = ", ".join(c.label for c in result.components)
        figures += [
            ReportFigure(
                "loss",
                f"Loss before and after ablating {what}",
                make_loss_figure(
                    str_tokens, result.loss_before, result.loss_after, result.failures, dark=dark
                ),
            ),
            ReportFigure(
                "delta-loss",
                "Δloss per token",
                make_delta_loss_figure(str_tokens, result.delta_loss, title="Δloss", dark=dark),
            ),
            ReportFigure("attention-change", "Downstream attention moved, per head", heatmap),
        ]
        if shown is not None:
            title = f"L{shown[0]}H{shown[1]} before and after the ablation"
            figures.append(ReportFigure("attention-before-after", title, patterns))
        options["ablation"] = {
            "components": [c.label for c in result.components],
            "method": request["method"],
            "source_prompt": request.get("source_prompt"),
            "reference_prompts": list(request.get("reference_prompts") or []),
            "memory_failures": [int(p) for p in result.failure_tokens],
        }

    # The sweep, if it is still cached.
    if sweep_request and (prompt is None or sweep_request["prompt"] == prompt):
        sweep = _open_sweep(sweep_request, chosen, cached_only=True)
        model, prompt = sweep_request["model"], sweep_request["prompt"]
        heads, layers = _sweep_figures(sweep, dark)
        figures += [
            ReportFigure("sweep-heads", "Sweep: Δ mean loss per head", heads),
            ReportFigure("sweep-layers", "Sweep: Δ mean loss per layer", layers),
        ]
        if chosen:
            selected = _selected_figure(sweep, chosen, dark)
            figures.append(
                ReportFigure("sweep-chosen-tokens", "Sweep: Δloss on chosen tokens", selected)
            )
        options["sweep"] = {
            "method": sweep_request["method"],
            "positions": sweep_request["positions"],
            "chosen_tokens": chosen,
        }

    pa = analysis.analyze(prompt, model)
    return FigureReport(
        model_id=model,
        fingerprint=str(pa.meta.get("fingerprint", "")),
        prompts=(prompt,),
        figures=tuple(figures),
        options=options,
        facts=(("Tokens", str(pa.n_pos)),),
    )


register_report_download(
    REPORT,
    [
        State(ABLATION, "data"),
        State(SWEEP, "data"),
        State(CHOSEN, "data"),
        State(ATTN_SELECTED, "data"),
        State(ANALYSIS, "data"),
        State(COLOR_MODE_SWITCH, "value"),
    ],
    report_inputs,
)
