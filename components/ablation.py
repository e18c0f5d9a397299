"""Figures and widgets of the Ablate page: loss before and after, predictions, how the attention
downstream of the ablation moved, and sweep heatmaps.

Every builder takes numpy arrays and plain Python values, never tensors. Loss arrays follow
``analysis.ablation.AblationResult``: entry i is the loss of predicting token i+1, so they are
drawn against tokens 1 to pos-1. A positive Δloss means the ablation hurt, and is drawn red
(the reverse of the Compare page's A − B scale, where red means "smaller").
Token text reaches Plotly only through :func:`components.tokens.plotly_text` and the page only
as Dash string children.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from dash import html

from components.compare import (
    MIN_DIFFERENCE_RANGE,
    diverging_colorscale,
    make_value_heatmap,
    signed_block_extreme,
    symmetric_range,
)
from components.figures import Figure, themed_figure
from components.heatmaps import (
    attention_colorscale,
    block_starts,
    causal_blocks,
    downsample_attention,
    span_label,
)
from components.tokens import TOKEN_CLASS, display_token, plotly_text, token_button_id, token_label

FAILURE_CLASS = "ml-token-failure"
CHOSEN_CLASS = "ml-token-chosen"
MAX_TABLE_ROWS = 400  # rows of the prediction table; longer prompts show their failures first
_BEFORE_COLOR = "#6c757d"
_AFTER_COLOR = "#0d6efd"
_HURT_COLOR = "#dc3545"
_HELPED_COLOR = "#198754"
# Cells per side of each of the three before / after / change panels before tokens are blocked.
MAX_PATTERN_SIDE = 128
_PATTERN_TICKS = 24  # token labels per axis of a pattern panel
_CELL = re.compile(r"^([LH])(\d+)$")


def hurt_colorscale(dark: bool) -> list:
    """Diverging scale with positive values (loss went up) red and negative ones blue."""
    scale = diverging_colorscale(dark)
    return [[round(1 - float(stop), 6), color] for stop, color in reversed(scale)]


def loss_axis_labels(str_tokens: Sequence[str]) -> list[str]:
    """Unique, Plotly-safe labels of the predicted tokens 1 to pos-1 (``"3 ·cat"``)."""
    return [token_label(position, text) for position, text in enumerate(str_tokens)][1:]


def _token_axis(labels: list[str]) -> dict:
    ticks = [label.split(" ", 1)[1] for label in labels]
    step = max(1, len(labels) // 48)
    return {
        "type": "category",
        "tickmode": "array",
        "tickvals": labels[::step],
        "ticktext": ticks[::step],
        "tickangle": -90,
        "title": {"text": "predicted token"},
    }


def make_loss_figure(
    str_tokens: Sequence[str],
    loss_before: np.ndarray,
    loss_after: np.ndarray,
    failures: np.ndarray,
    *,
    title: str = "",
    dark: bool = False,
    height: int = 300,
) -> Figure:
    """Per-token loss before and after the ablation, failures marked with a red cross.

    Args:
        str_tokens: The prompt's tokens, ``[pos]``.
        loss_before: Clean loss, ``[pos - 1]``.
        loss_after: Ablated loss, ``[pos - 1]``.
        failures: Memory failures, ``[pos - 1]`` bool.
        title: Figure title (escaped here).
        dark: Use the dark template.
        height: Figure height in pixels.
    """
    labels = loss_axis_labels(str_tokens)
    before = np.asarray(loss_before, dtype=np.float32)
    after = np.asarray(loss_after, dtype=np.float32)
    broken = np.asarray(failures, dtype=bool)
    if not before.shape == after.shape == broken.shape == (len(labels),):
        raise ValueError(
            f"loss arrays of shapes {before.shape}, {after.shape}, {broken.shape} do not match "
            f"the {len(labels)} predicted tokens of a {len(str_tokens)}-token prompt"
        )
    hover = "%{x}<br>%{y:.3f} nats<extra>%{fullData.name}</extra>"
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "before",
            "x": labels,
            "y": before,
            "line": {"color": _BEFORE_COLOR, "dash": "dot"},
            "marker": {"size": 4},
            "hovertemplate": hover,
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "after",
            "x": labels,
            "y": after,
            "line": {"color": _AFTER_COLOR},
            "marker": {"size": 4},
            "hovertemplate": hover,
        },
    ]
    if broken.any():
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "memory failure",
                "x": [label for label, bad in zip(labels, broken, strict=True) if bad],
                "y": after[broken],
                "marker": {"symbol": "x", "size": 10, "color": _HURT_COLOR},
                "hovertemplate": hover,
            }
        )
    layout = {
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 13}},
        "height": height,
        # Room above the plot for the legend, on the left so the hover modebar never covers it.
        "margin": {"l": 10, "r": 10, "t": 56 if title else 36, "b": 10},
        "xaxis": _token_axis(labels),
        "yaxis": {"title": {"text": "loss (nats)"}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"},
    }
    return themed_figure(traces, layout, dark=dark)


def make_delta_loss_figure(
    str_tokens: Sequence[str],
    delta: np.ndarray,
    *,
    title: str = "",
    dark: bool = False,
    height: int = 260,
) -> Figure:
    """Δloss per predicted token as bars: red where the ablation hurt, green where it helped.

    Args:
        str_tokens: The prompt's tokens, ``[pos]``.
        delta: ``loss_after - loss_before``, ``[pos - 1]`` (NaN bars are left out).
        title: Figure title (escaped here).
        dark: Use the dark template.
        height: Figure height in pixels.
    """
    labels = loss_axis_labels(str_tokens)
    delta = np.asarray(delta, dtype=np.float32)
    if delta.shape != (len(labels),):
        raise ValueError(
            f"Δloss of shape {delta.shape} does not match the {len(labels)} predicted tokens"
        )
    colors = [_HURT_COLOR if value > 0 else _HELPED_COLOR for value in np.nan_to_num(delta)]
    trace = {
        "type": "bar",
        "x": labels,
        "y": delta,
        "marker": {"color": colors},
        "hovertemplate": "%{x}<br>Δloss %{y:+.3f} nats<extra></extra>",
    }
    layout = {
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 13}},
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 36 if title else 10, "b": 10},
        "xaxis": _token_axis(labels),
        "yaxis": {"title": {"text": "Δloss (nats)"}, "zeroline": True},
        "showlegend": False,
    }
    return themed_figure([trace], layout, dark=dark)


def make_sweep_heatmap(
    values: np.ndarray,
    *,
    title: str = "",
    value_name: str = "Δ mean loss",
    dark: bool = False,
) -> Figure:
    """Layers down, heads across: the loss change when each head alone is ablated.

    Args:
        values: ``[n_layers, n_heads]`` (NaN where not run), e.g. ``SweepResult.head_delta``.
        title: Figure title.
        value_name: What a cell holds, for the hover and colour bar.
        dark: Use the dark template.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a sweep heatmap needs [n_layers, n_heads] values, got {values.shape}")
    n_layers, n_heads = values.shape
    layers = [f"L{layer}" for layer in range(n_layers)]
    heads = [f"H{head}" for head in range(n_heads)]
    return _signed_heatmap(
        values, (heads, heads), (layers, layers), "head", title, value_name, dark
    )


def make_layer_sweep_heatmap(
    attn: np.ndarray,
    mlp: np.ndarray,
    *,
    title: str = "",
    value_name: str = "Δ mean loss",
    dark: bool = False,
) -> Figure:
    """Layers down, two columns (whole attention layer, MLP layer) of the loss change.

    Args:
        attn: ``[n_layers]`` (``SweepResult.attn_delta``).
        mlp: ``[n_layers]`` (``SweepResult.mlp_delta``).
        title: Figure title.
        value_name: What a cell holds.
        dark: Use the dark template.
    """
    values = np.stack([np.asarray(attn, np.float32), np.asarray(mlp, np.float32)], axis=1)
    layers = [f"L{layer}" for layer in range(values.shape[0])]
    kinds = ["attn", "MLP"]
    return _signed_heatmap(values, (kinds, kinds), (layers, layers), "", title, value_name, dark)


def _signed_heatmap(values, x, y, x_title, title, value_name, dark) -> Figure:
    peak = symmetric_range(values, floor=0.05)
    figure = make_value_heatmap(
        values,
        x,
        y,
        title=title,
        x_title=x_title,
        y_title="layer",
        signed=True,
        zrange=(-peak, peak),
        colorbar_title="Δloss",
        value_name=value_name,
        dark=dark,
        height=min(600, 110 + 40 * values.shape[0]),
        show_values=True,
    )
    figure["data"][0]["colorscale"] = hurt_colorscale(dark)
    return figure


# --- Downstream attention ----------------------------------------------------------------------


def change_grid(change: np.ndarray, layers: Sequence[int], n_layers: int) -> np.ndarray:
    """Downstream attention change on the whole model's grid, ``[n_layers, n_heads]``: rows of
    ``layers`` from ``change`` ``[len(layers), n_heads]``, NaN for the layers it cannot reach."""
    change = np.asarray(change, dtype=np.float32)
    if change.ndim != 2 or change.shape[0] != len(layers):
        raise ValueError(
            f"attention change of shape {change.shape} does not match the {len(layers)} "
            "downstream layers"
        )
    grid = np.full((n_layers, change.shape[1]), np.nan, dtype=np.float32)
    grid[list(layers)] = change
    return grid


def make_attention_change_heatmap(
    grid: np.ndarray,
    *,
    selected: tuple[int, int] | None = None,
    title: str = "",
    dark: bool = False,
) -> Figure:
    """Layers down, heads across: how far each head's attention moved after the ablation.

    Blank rows are layers the ablation cannot reach (its own layer and those below).

    Args:
        grid: ``[n_layers, n_heads]`` mean total-variation distance per head, NaN where not
            downstream (:func:`change_grid` of ``AblationResult.attention_change()``).
        selected: ``(layer, head)`` to frame, the head shown in the pattern view.
        title: Figure title.
        dark: Use the dark template.
    """
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"an attention-change heatmap needs [n_layers, n_heads], got {grid.shape}")
    n_layers, n_heads = grid.shape
    layers = [f"L{layer}" for layer in range(n_layers)]
    heads = [f"H{head}" for head in range(n_heads)]
    peak = symmetric_range(grid, floor=MIN_DIFFERENCE_RANGE)
    shapes = []
    if selected is not None:
        layer, head = selected
        line = {"color": "#0dcaf0" if dark else "#dc3545", "width": 3}
        shapes.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "y",
                "x0": head - 0.5,
                "x1": head + 0.5,
                "y0": layer - 0.5,
                "y1": layer + 0.5,
                "line": line,
                "fillcolor": "rgba(0,0,0,0)",
            }
        )
    figure = make_value_heatmap(
        grid,
        (heads, heads),
        (layers, layers),
        title=title,
        x_title="head",
        y_title="layer",
        zrange=(0.0, peak),
        colorbar_title="TV",
        value_name="mean total-variation distance",
        dark=dark,
        height=min(600, 110 + 40 * n_layers),
        shapes=shapes,
        show_values=True,
    )
    figure["data"][0]["colorscale"] = attention_colorscale(dark)
    return figure


def parse_change_click(click_data: object) -> tuple[int, int] | None:
    """``(layer, head)`` of a click on :func:`make_attention_change_heatmap`, else None."""
    try:
        point = click_data["points"][0]  # type: ignore[index]
        x, y = _CELL.match(str(point["x"])), _CELL.match(str(point["y"]))
    except (TypeError, KeyError, IndexError):
        return None
    if x is None or y is None or x.group(1) != "H" or y.group(1) != "L":
        return None
    return int(y.group(2)), int(x.group(2))


def make_pattern_comparison(
    before: np.ndarray,
    after: np.ndarray,
    str_tokens: Sequence[str],
    *,
    title: str = "",
    dark: bool = False,
    max_side: int = MAX_PATTERN_SIDE,
    height: int = 420,
) -> Figure:
    """One head's attention before the ablation, after it, and after − before, side by side.

    Queries run down and keys across. Long prompts are shown in blocks of tokens: before and
    after hold each block's largest weight, the change its change of largest magnitude (sign
    kept). The change's colours span its largest magnitude, at least
    :data:`~components.compare.MIN_DIFFERENCE_RANGE`, red where attention fell.

    Args:
        before: ``[q_pos, k_pos]`` clean pattern of the head.
        after: ``[q_pos, k_pos]`` its pattern in the ablated run.
        str_tokens: ``[pos]`` the tokens as text.
        title: Figure title (escaped here).
        dark: Use the dark template.
        max_side: Most cells per side of each panel before tokens are grouped into blocks.
        height: Figure height in pixels.
    """
    before = np.asarray(before, dtype=np.float32)
    after = np.asarray(after, dtype=np.float32)
    n_pos = len(str_tokens)
    if not before.shape == after.shape == (n_pos, n_pos):
        raise ValueError(
            f"patterns of shapes {before.shape} and {after.shape} do not match the {n_pos} "
            "tokens: expected [pos, pos] each"
        )

    # Block long prompts; the change keeps its sign where a block maximum would hide falls.
    starts = block_starts(n_pos, max_side)
    causal = causal_blocks(starts, n_pos)
    delta = np.where(causal, signed_block_extreme(after - before, starts, starts), np.nan)
    panels = [downsample_attention(before, starts), downsample_attention(after, starts), delta]
    stops = np.append(starts[1:], n_pos)
    labels = [
        span_label(list(str_tokens), int(a), int(b)) for a, b in zip(starts, stops, strict=True)
    ]
    if len(starts) < n_pos:
        block = f"blocks of {int(starts[1])} tokens"
        title = f"{title} · {block}" if title else block
    peak = symmetric_range(delta, floor=MIN_DIFFERENCE_RANGE)

    # Three panels in a row; before and after share the weight colour bar.
    every = max(1, -(-len(labels) // _PATTERN_TICKS))
    ticks = [plotly_text(display_token(str_tokens[int(s)])) for s in starts]
    domains = [(0.0, 0.28), (0.345, 0.625), (0.69, 0.97)]
    names = ["before", "after", "after − before"]
    traces, layout = [], {}
    for index, (z, name, (x0, x1)) in enumerate(zip(panels, names, domains, strict=True)):
        suffix = "" if index == 0 else str(index + 1)
        value = "Δ weight %{z:+.3f}" if index == 2 else "weight %{z:.3f}"
        traces.append(
            {
                "type": "heatmap",
                "z": z,
                "x": labels,
                "y": labels,
                "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "coloraxis": "coloraxis2" if index == 2 else "coloraxis",
                "hovertemplate": f"{name}<br>query %{{y}}<br>key %{{x}}<br>{value}<extra></extra>",
                "hoverongaps": False,
            }
        )
        axis = {
            "type": "category",
            "tickmode": "array",
            "tickvals": labels[::every],
            "ticktext": ticks[::every],
            "tickfont": {"size": 9},
            "showgrid": False,
            "zeroline": False,
        }
        layout[f"xaxis{suffix}"] = {
            **axis,
            "domain": [x0, x1],
            "anchor": f"y{suffix}",
            "tickangle": -90,
            "title": {"text": f"{name} · key", "font": {"size": 12}},
        }
        layout[f"yaxis{suffix}"] = {
            **axis,
            "domain": [0.0, 1.0],
            "anchor": f"x{suffix}",
            "autorange": "reversed",
            "showticklabels": index == 0,
            "title": {"text": "query" if index == 0 else ""},
        }
    colorbar = {"thickness": 10, "len": 0.9, "title": {"side": "right"}}
    layout |= {
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 13}},
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 36 if title else 10, "b": 10},
        "coloraxis": {
            "cmin": 0.0,
            "cmax": 1.0,
            "colorscale": attention_colorscale(dark),
            "colorbar": {**colorbar, "x": 0.632, "title": {"text": "weight", "side": "right"}},
        },
        "coloraxis2": {
            "cmin": -peak,
            "cmax": peak,
            "colorscale": diverging_colorscale(dark),
            "colorbar": {**colorbar, "x": 0.977, "title": {"text": "Δ", "side": "right"}},
        },
    }
    return themed_figure(traces, layout, dark=dark)


# --- Widgets -----------------------------------------------------------------------------------


def ablate_token_class(position: int, failures: Sequence[int], chosen: Sequence[int]) -> str:
    """CSS classes of a token chip: failed tokens outlined red, chosen ones filled."""
    classes = [TOKEN_CLASS]
    if position in failures:
        classes.append(FAILURE_CLASS)
    if position in chosen:
        classes.append(CHOSEN_CLASS)
    return " ".join(classes)


def make_ablate_token_strip(
    str_tokens: Sequence[str],
    *,
    token_type: str,
    failures: Sequence[int] = (),
    chosen: Sequence[int] = (),
) -> html.Div:
    """Every token as a clickable chip; memory failures and chosen tokens highlighted.

    Args:
        str_tokens: The tokens as text, ``[pos]``.
        token_type: ``type`` of the chips' pattern-matching ids.
        failures: Positions whose prediction broke (``AblationResult.failure_tokens``).
        chosen: Positions the user picked for the sweep's selected-token view.
    """
    return html.Div(
        [
            html.Button(
                display_token(text),
                id=token_button_id(token_type, position),
                className=ablate_token_class(position, failures, chosen),
                title=f"position {position}",
                n_clicks=0,
            )
            for position, text in enumerate(str_tokens)
        ],
        className="ml-token-strip",
    )


def prediction_rows(
    str_tokens: Sequence[str],
    top_str_before: Sequence[str],
    top_str_after: Sequence[str],
    top_prob_before: np.ndarray,
    top_prob_after: np.ndarray,
    failures: np.ndarray,
    *,
    limit: int = MAX_TABLE_ROWS,
) -> list[dict]:
    """Rows of the prediction table, one per predicted token; failures first when cut short.

    Returns:
        Dicts with ``pos`` (the predicted token's position), ``context`` (the token before it),
        ``target``, ``before``, ``after`` (texts with visible whitespace and probabilities),
        ``changed`` and ``failure``.
    """
    rows = []
    for index in range(len(str_tokens) - 1):
        before, after = top_str_before[index], top_str_after[index]
        rows.append(
            {
                "pos": index + 1,
                "context": display_token(str_tokens[index]),
                "target": display_token(str_tokens[index + 1]),
                "before": f"{display_token(before)} ({float(top_prob_before[index]):.2f})",
                "after": f"{display_token(after)} ({float(top_prob_after[index]):.2f})",
                "changed": before != after,
                "failure": bool(failures[index]),
            }
        )
    if len(rows) > limit:
        rows = sorted(rows, key=lambda row: not row["failure"])[:limit]
        rows.sort(key=lambda row: row["pos"])
    return rows


def make_prediction_table(rows: list[dict]) -> html.Div:
    """A compact table of top-1 predictions before and after; failure rows shaded red."""
    header = html.Thead(
        html.Tr(
            [html.Th(name) for name in ("pos", "after token", "target", "top before", "top after")]
        )
    )
    body = html.Tbody(
        [
            html.Tr(
                [
                    html.Td(str(row["pos"])),
                    html.Td(row["context"], className="font-monospace"),
                    html.Td(row["target"], className="font-monospace"),
                    html.Td(row["before"], className="font-monospace"),
                    html.Td(
                        row["after"],
                        className="font-monospace" + (" fw-semibold" if row["changed"] else ""),
                    ),
                ],
                className="table-danger" if row["failure"] else None,
            )
            for row in rows
        ]
    )
    return html.Div(
        html.Table([header, body], className="table table-sm small mb-0"),
        className="ml-ablate-table",
    )
