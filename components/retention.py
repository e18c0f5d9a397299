"""Figures of the Retention and Heads pages: layers x positions, memory reach, logit lens, retention
curves, direct logit attribution, memory horizon and per-head scores.

Every builder takes numpy arrays and plain Python values, never tensors. A *stage* is a row of
the residual stream as in :meth:`analysis.prompt.PromptAnalysis.resid`: stage 0 is the
embedding, stage ``l`` what block ``l - 1`` wrote, stage ``n_layers`` the final stream, so
per-layer arrays have ``n_layers + 1`` rows; :func:`stage_labels` names them. Layers run down
the page, as on the Attention page. Token text reaches Plotly only through
:func:`components.tokens.plotly_text`. Figures are built from dicts without Plotly's validation,
as in :mod:`components.heatmaps`; the tests check what validation would have caught.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from dash import dash_table
from plotly.colors import get_colorscale, qualitative

from components.figures import Figure, themed_figure
from components.heatmaps import attention_colorscale
from components.tokens import display_token, plotly_text, token_label

LABELLED_TICKS = 64  # at most this many token labels per axis
SHOW_VALUES_CELLS = 64  # print each cell's value when a layers x heads map has at most this many
VALUE_SCALE = get_colorscale("Viridis")
# Diverging, negative red and positive blue (plotly.py's orientation, given as a list because
# plotly.js reads the name "RdBu" the other way round).
SIGNED_SCALE = get_colorscale("RdBu")
CURVE_COLORS = qualitative.Plotly
RANK_TICKS = (0, 1, 10, 100, 1_000, 10_000, 100_000)


def _head_axis(n_heads: int, every: int = 1) -> dict:
    """An x axis labelled H0, H1, ... (every ``every``-th head)."""
    heads = range(0, n_heads, every)
    return {
        "tickmode": "array",
        "tickvals": list(heads),
        "ticktext": [f"H{head}" for head in heads],
        "title": {"text": "head"},
        "showgrid": False,
        "zeroline": False,
    }


def _layer_axis(n_layers: int) -> dict:
    """A y axis labelled L0, L1, ... from the top down."""
    return {
        "tickmode": "array",
        "tickvals": list(range(n_layers)),
        "ticktext": [f"L{layer}" for layer in range(n_layers)],
        "autorange": "reversed",
        "title": {"text": "layer"},
        "showgrid": False,
        "zeroline": False,
    }


def stage_labels(n_layers: int) -> list[str]:
    """Names of the ``n_layers + 1`` residual-stream stages: ``embed``, ``after L0``, ..."""
    return ["embed"] + [f"after L{layer}" for layer in range(n_layers)]


def quoted(text: str) -> str:
    """A token for captions and titles: whitespace visible, in quotes (not yet escaped)."""
    return f"“{display_token(text)}”"


def log_rank(rank: np.ndarray) -> np.ndarray:
    """``log10(rank + 1)``: zero-based ranks on a log scale where the top rank is 0."""
    return np.log10(np.asarray(rank, dtype=np.float64) + 1.0).astype(np.float32)


def rank_ticks(highest: float) -> tuple[list[float], list[str]]:
    """Tick positions (on the :func:`log_rank` scale) and labels for ranks up to ``highest``."""
    shown = [rank for rank in RANK_TICKS if rank <= max(highest, 1)]
    shown += [rank for rank in RANK_TICKS if rank > max(highest, 1)][:1]  # one past the data
    return [float(log_rank(np.array(rank))) for rank in shown], [f"{rank:,}" for rank in shown]


# --- Shared pieces -----------------------------------------------------------------------------


def _title(text: str) -> dict:
    return {"text": plotly_text(text), "x": 0, "xanchor": "left", "font": {"size": 14}}


def _accent(dark: bool) -> str:
    return "#0dcaf0" if dark else "#dc3545"


def position_labels(str_tokens: Sequence[str], positions: Sequence[int]) -> tuple[list, list]:
    """``(labels, ticks)`` for token columns: unique ``"12 ·cat"`` labels and ``"·cat"`` ticks,
    both Plotly-escaped."""
    labels = [token_label(int(pos), str_tokens[int(pos)]) for pos in positions]
    ticks = [plotly_text(display_token(str_tokens[int(pos)])) for pos in positions]
    return labels, ticks


def _token_axis(labels: list[str], ticks: list[str], title: str) -> dict:
    """A category axis of tokens: every label when they fit, else an evenly spaced subset."""
    every = max(1, math.ceil(len(labels) / LABELLED_TICKS))
    return {
        "type": "category",
        "tickmode": "array",
        "tickvals": labels[::every],
        "ticktext": ticks[::every],
        "tickfont": {"size": 10},
        "tickangle": -90,
        "showgrid": False,
        "zeroline": False,
        "automargin": True,
        "title": {"text": title},
    }


def _column_frame(column: int, dark: bool) -> dict:
    """A frame around column ``column`` of a heatmap on a category axis."""
    return {
        "type": "rect",
        "xref": "x",
        "yref": "y domain",
        "x0": column - 0.5,
        "x1": column + 0.5,
        "y0": 0,
        "y1": 1,
        "line": {"color": _accent(dark), "width": 2},
        "fillcolor": "rgba(0,0,0,0)",
        "layer": "above",
    }


# --- Layers x positions --------------------------------------------------------------------


def make_stage_heatmap(
    values: np.ndarray,
    str_tokens: Sequence[str],
    positions: Sequence[int],
    *,
    title: str,
    value_name: str,
    hover_values: np.ndarray | None = None,
    value_format: str = ".3f",
    cell_notes: Sequence[Sequence[str]] | None = None,
    column_notes: Sequence[str] | None = None,
    zrange: tuple[float, float] | None = None,
    colorscale: list | None = None,
    reverse_scale: bool = False,
    colorbar_ticks: tuple[list[float], list[str]] | None = None,
    x_title: str = "position",
    selected_column: int | None = None,
    dark: bool = False,
    height: int = 340,
) -> Figure:
    """A stages (down) x token columns (across) heatmap, the columns labelled with tokens.

    Args:
        values: ``[n_layers + 1, n_cols]`` colour values (NaN cells blank).
        str_tokens: ``[pos]`` every token of the prompt as text.
        positions: ``[n_cols]`` the position each column shows.
        title: Figure title.
        value_name: What a cell holds, for the hover text and the colour bar.
        hover_values: ``[n_layers + 1, n_cols]`` numbers for the hover when ``values`` are
            transformed (log ranks); ``values`` by default.
        value_format: d3 format of the hover number.
        cell_notes: ``[n_layers + 1][n_cols]`` an extra hover line per cell (already text, not
            escaped yet).
        column_notes: ``[n_cols]`` an extra hover line per column (not escaped yet).
        zrange: ``(zmin, zmax)``; the data's range by default.
        colorscale: Colour scale as a list; Viridis by default.
        reverse_scale: Bright for low values (ranks, where 0 is best).
        colorbar_ticks: ``(tickvals, ticktext)`` of the colour bar.
        x_title: Column axis title.
        selected_column: Index of a column to frame.
        dark: Use the dark template.
        height: Figure height in pixels.
    """
    values = np.asarray(values, dtype=np.float32)
    n_stages, n_cols = values.shape
    if n_cols != len(positions):
        raise ValueError(f"values have {n_cols} columns but {len(positions)} positions were given")
    labels, ticks = position_labels(str_tokens, positions)
    rows = stage_labels(n_stages - 1)
    hover = np.asarray(values if hover_values is None else hover_values, dtype=np.float64)

    # customdata carries the hover number and the optional notes, cell by cell.
    cells = np.empty((n_stages, n_cols, 3), dtype=object)
    cells[..., 0] = hover
    cells[..., 1] = ""
    cells[..., 2] = ""
    if cell_notes is not None:
        cells[..., 1] = [[plotly_text(note) for note in row] for row in cell_notes]
    if column_notes is not None:
        cells[..., 2] = [plotly_text(note) + "<br>" for note in column_notes]
    colorbar = {"title": {"text": plotly_text(value_name)}, "thickness": 12, "len": 0.9}
    if colorbar_ticks is not None:
        colorbar |= {"tickmode": "array", "tickvals": colorbar_ticks[0]}
        colorbar["ticktext"] = colorbar_ticks[1]
    zmin, zmax = zrange if zrange else (None, None)
    heatmap = {
        "type": "heatmap",
        "z": values,
        "x": labels,
        "y": rows,
        "customdata": cells.tolist(),
        "zmin": zmin,
        "zmax": zmax,
        "colorscale": colorscale or VALUE_SCALE,
        "reversescale": reverse_scale,
        "colorbar": colorbar,
        "hovertemplate": (
            f"%{{y}} · {x_title} %{{x}}<br>%{{customdata[2]}}"
            f"{plotly_text(value_name)}: %{{customdata[0]:{value_format}}}<br>"
            "%{customdata[1]}<extra></extra>"
        ),
        "hoverongaps": False,
        "xgap": 1 if n_cols <= 64 else 0,
        "ygap": 1,
    }
    shapes = []
    if selected_column is not None and 0 <= selected_column < n_cols:
        shapes.append(_column_frame(selected_column, dark))
    layout = {
        "title": _title(title),
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": _token_axis(labels, ticks, x_title),
        "yaxis": {
            "type": "category",
            "autorange": "reversed",
            "automargin": True,
            "showgrid": False,
            "title": {"text": "residual stream"},
        },
        "shapes": shapes,
    }
    return themed_figure([heatmap], layout, dark=dark)


def make_composition_heatmap(
    shares: np.ndarray,
    str_tokens: Sequence[str],
    pos: int,
    *,
    source: int | None = None,
    bos: bool = False,
    dark: bool = False,
    height: int = 340,
) -> Figure:
    """Attention rollout for one position: what its stream is made of after every layer.

    The colour scale ends at the largest share after layer 0 outside a BOS column: BOS is
    usually an attention sink holding most of every stream, and the trivial stage-0 row is all
    the token itself; on a 0-1 scale every other token would look blank. Hover shows true values.

    Args:
        shares: ``[n_layers + 1, pos]`` from :func:`analysis.retention.rollout_shares`.
        str_tokens: ``[pos]`` the tokens as text.
        pos: The position whose stream is decomposed; only sources ``0 .. pos`` are shown.
        source: A source column to frame (the memory-reach source), if it is shown.
        bos: Position 0 is a BOS token (kept off the colour scale).
        dark: Use the dark template.
        height: Figure height in pixels.
    """
    shares = np.asarray(shares, dtype=np.float32)[:, : pos + 1]
    rest = shares[1:, 1:] if bos else shares[1:]
    top = float(rest.max()) if rest.size else 0.0
    return make_stage_heatmap(
        shares,
        str_tokens,
        range(pos + 1),
        title=f"What token {pos} {quoted(str_tokens[pos])} is made of, layer by layer",
        value_name="share",
        zrange=(0.0, top if top > 0 else 1.0),
        colorscale=attention_colorscale(dark),
        x_title="source token",
        selected_column=source if source is not None and source <= pos else None,
        dark=dark,
        height=height,
    )


def make_reach_bars(
    reach: np.ndarray,
    str_tokens: Sequence[str],
    source: int,
    *,
    stage_name: str,
    dark: bool = False,
    height: int = 340,
) -> Figure:
    """Memory reach: the share of one source token in the stream of every position from it on
    (earlier positions cannot hold it).

    Args:
        reach: ``[pos]`` from :func:`analysis.retention.memory_reach` (0 before ``source``).
        str_tokens: ``[pos]`` the tokens as text.
        source: The source token's position (its own bar is highlighted).
        stage_name: The stage read, as in :func:`stage_labels`.
        dark: Use the dark template.
        height: Figure height in pixels.
    """
    reach = np.asarray(reach, dtype=np.float32)
    positions = range(source, len(reach))
    labels, ticks = position_labels(str_tokens, positions)
    base = "#6ea8fe" if dark else "#0d6efd"
    colors = [_accent(dark) if pos == source else base for pos in positions]
    bars = {
        "type": "bar",
        "x": labels,
        "y": reach[source:],
        "marker": {"color": colors},
        "hovertemplate": (f"position %{{x}}<br>share of token {source}: %{{y:.3f}}<extra></extra>"),
    }
    title = f"Where token {source} {quoted(str_tokens[source])} reaches ({stage_name})"
    layout = {
        "title": _title(title),
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": _token_axis(labels, ticks, "position whose stream it reaches"),
        "yaxis": {
            "title": {"text": f"share of token {source}"},
            "rangemode": "tozero",
            "automargin": True,
        },
        "bargap": 0.15,
    }
    return themed_figure([bars], layout, dark=dark)


# --- Logit lens ------------------------------------------------------------------------------


def make_top_tokens_table(
    top_probs: np.ndarray,
    top_tokens: Sequence[Sequence[str]],
    str_tokens: Sequence[str],
    pos: int,
    *,
    next_token: str | None = None,
    dark: bool = False,
) -> Figure:
    """The logit lens at one position: the top-k tokens and probabilities after every layer.

    Args:
        top_probs: ``[n_layers + 1, k]`` probabilities, descending along k.
        top_tokens: ``[n_layers + 1][k]`` the tokens as text.
        str_tokens: ``[pos]`` the prompt's tokens as text.
        pos: The position read.
        next_token: The token that actually follows ``pos`` (marked with ✓), None at the end.
        dark: Use the dark template.
    """
    top_probs = np.asarray(top_probs, dtype=np.float32)
    n_stages, k = top_probs.shape
    text = [
        [plotly_text(display_token(token)) + (" ✓" if token == next_token else "") for token in row]
        for row in top_tokens
    ]
    heatmap = {
        "type": "heatmap",
        "z": top_probs,
        "x": [f"#{index + 1}" for index in range(k)],
        "y": stage_labels(n_stages - 1),
        "text": text,
        "texttemplate": "%{text}<br>%{z:.2f}",
        "textfont": {"size": 11, "family": "monospace"},
        "zmin": 0.0,
        "zmax": 1.0,
        "colorscale": VALUE_SCALE,
        "colorbar": {"title": {"text": "probability"}, "thickness": 12, "len": 0.9},
        "hovertemplate": "%{y} · guess %{x}: %{text}<br>probability %{z:.3f}<extra></extra>",
        "xgap": 2,
        "ygap": 2,
    }
    follows = f", next is {quoted(next_token)}" if next_token is not None else ""
    title = f"Logit lens at token {pos} {quoted(str_tokens[pos])}{follows}"
    layout = {
        "title": _title(title),
        "height": 120 + 48 * n_stages,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {"title": {"text": "guess (most probable first)"}, "side": "bottom"},
        "yaxis": {"autorange": "reversed", "automargin": True, "title": {"text": ""}},
    }
    return themed_figure([heatmap], layout, dark=dark)


def make_kl_chart(
    kl_at_pos: np.ndarray, mean_kl: np.ndarray, pos: int, *, dark: bool = False
) -> Figure:
    """KL divergence of every stage's logit-lens distribution from the final one.

    Args:
        kl_at_pos: ``[n_layers + 1]`` at the chosen position.
        mean_kl: ``[n_layers + 1]`` averaged over positions.
        pos: The chosen position (for the legend).
        dark: Use the dark template.
    """
    stages = stage_labels(len(kl_at_pos) - 1)
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "x": stages,
            "y": np.asarray(kl_at_pos, dtype=np.float32),
            "name": f"token {pos}",
            "line": {"color": _accent(dark), "width": 3},
            "hovertemplate": "%{x}: %{y:.3f} nats<extra>token " + str(pos) + "</extra>",
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "x": stages,
            "y": np.asarray(mean_kl, dtype=np.float32),
            "name": "mean over tokens",
            "line": {"color": "#6c757d", "dash": "dash"},
            "hovertemplate": "%{x}: %{y:.3f} nats<extra>mean</extra>",
        },
    ]
    layout = {
        "title": _title("How far each layer's guess is from the final prediction"),
        "height": 260,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {"type": "category", "title": {"text": "residual stream"}},
        "yaxis": {
            "title": {"text": "KL(final ‖ layer), nats"},
            "rangemode": "tozero",
            "automargin": True,
        },
        # The curves fall towards the last layer, so the top right corner stays free.
        "legend": {"y": 0.98, "yanchor": "top", "x": 0.98, "xanchor": "right"},
    }
    return themed_figure(traces, layout, dark=dark)


# --- Retention curves ------------------------------------------------------------------------


CURVE_PANELS = (
    ("embedding_cosine", "cosine to own embedding"),
    ("token_rank", "logit-lens rank of the token"),
    ("rollout_share", "rollout share of the token"),
)


def make_retention_curves(
    curves: dict[str, np.ndarray],
    str_tokens: Sequence[str],
    positions: Sequence[int],
    *,
    dark: bool = False,
) -> Figure:
    """One line per chosen token across the stages, in three panels: cosine to its embedding,
    its logit-lens rank (log scale, top rank up) and its rollout share of its own stream.

    Args:
        curves: :func:`analysis.retention.retention_curves` output, ``{name: [n_tokens,
            n_layers + 1]}``.
        str_tokens: ``[pos]`` the tokens as text.
        positions: ``[n_tokens]`` the positions followed.
        dark: Use the dark template.
    """
    n_stages = curves["embedding_cosine"].shape[-1]
    stages = stage_labels(n_stages - 1)
    gap = 0.07
    width = (1 - 2 * gap) / 3
    traces, annotations, axes = [], [], {}
    highest_rank = float(np.max(curves["token_rank"])) if len(positions) else 1.0
    for panel, (name, panel_title) in enumerate(CURVE_PANELS):
        suffix = "" if panel == 0 else str(panel + 1)
        x0 = panel * (width + gap)
        axes[f"xaxis{suffix}"] = {
            "domain": [x0, x0 + width],
            "anchor": f"y{suffix}",
            "type": "category",
            "tickangle": -45,
            "automargin": True,
        }
        axes[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "automargin": True}
        annotations.append(
            {
                "text": panel_title,
                "x": x0 + width / 2,
                "y": 1.0,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 13},
            }
        )
        for index, pos in enumerate(positions):
            raw = np.asarray(curves[name][index], dtype=np.float64)
            y = log_rank(raw) if name == "token_rank" else raw
            label = f"{pos} {display_token(str_tokens[pos])}"
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "x": stages,
                    "y": y,
                    "customdata": raw,
                    "xaxis": f"x{suffix}",
                    "yaxis": f"y{suffix}",
                    "name": plotly_text(label),
                    "legendgroup": str(pos),
                    "showlegend": panel == 0,
                    "line": {"color": CURVE_COLORS[index % len(CURVE_COLORS)]},
                    "hovertemplate": (
                        f"{plotly_text(label)}<br>%{{x}}: %{{customdata:"
                        f"{',d' if name == 'token_rank' else '.3f'}}}<extra></extra>"
                    ),
                }
            )
    axes["yaxis"] |= {"range": [-1.05, 1.05], "title": {"text": "cosine"}}
    tickvals, ticktext = rank_ticks(highest_rank)
    axes["yaxis2"] |= {
        "autorange": "reversed",
        "tickmode": "array",
        "tickvals": tickvals,
        "ticktext": ticktext,
        "title": {"text": "rank (0 = top guess)"},
    }
    axes["yaxis3"] |= {"range": [0, 1.05], "title": {"text": "share"}}
    layout = {
        **axes,
        "title": _title("Retention curves: how much of each chosen token survives, layer by layer"),
        "annotations": annotations,
        "height": 360,
        "margin": {"l": 10, "r": 10, "t": 70, "b": 10},
        "legend": {"orientation": "h", "y": -0.3, "yanchor": "top", "x": 0},
    }
    return themed_figure(traces, layout, dark=dark)


# --- Direct logit attribution ------------------------------------------------------------------


def make_attribution_figure(
    heads: np.ndarray,
    parts: Sequence[tuple[str, float]],
    *,
    title: str,
    dark: bool = False,
) -> Figure:
    """Direct logit attribution: each head (layers x heads, left) and each part of the residual
    stream (bars, right, in the order the stream sums them), blue raising the logit and red
    lowering it.

    Args:
        heads: ``[n_layers, n_heads]`` each head's contribution.
        parts: ``(name, contribution)`` of the embeddings and each layer's attention and MLP, left
            to right.
        title: Figure title.
        dark: Use the dark template.
    """
    heads = np.asarray(heads, dtype=np.float32)
    n_layers, n_heads = heads.shape
    peak = float(np.nanmax(np.abs(heads))) if heads.size else 0.0
    peak = peak if peak > 0 else 1.0
    names = [name for name, _ in parts]
    values = np.asarray([value for _, value in parts], dtype=np.float32)
    blue, red = ("#6ea8fe", "#ea868f") if dark else ("#2166ac", "#b2182b")
    traces = [
        {
            "type": "heatmap",
            "z": heads,
            "x": list(range(n_heads)),
            "y": list(range(n_layers)),
            "zmin": -peak,
            "zmax": peak,
            "colorscale": SIGNED_SCALE,
            "colorbar": {"title": {"text": "logit"}, "thickness": 12, "len": 0.9, "x": 0.37},
            "texttemplate": "%{z:.2f}" if heads.size <= SHOW_VALUES_CELLS else None,
            "textfont": {"size": 10},
            "hovertemplate": "L%{y} H%{x}: %{z:+.3f}<extra></extra>",
            "xgap": 2,
            "ygap": 2,
        },
        {
            "type": "bar",
            "x": names,
            "y": values,
            "xaxis": "x2",
            "yaxis": "y2",
            "marker": {"color": [blue if value >= 0 else red for value in values]},
            "hovertemplate": "%{x}: %{y:+.3f}<extra></extra>",
        },
    ]
    layout = {
        "title": _title(title),
        "height": max(320, 160 + 40 * n_layers),
        "showlegend": False,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {"domain": [0.0, 0.33], **_head_axis(n_heads)},
        "yaxis": _layer_axis(n_layers),
        "xaxis2": {
            "domain": [0.52, 1.0],
            "anchor": "y2",
            "type": "category",
            "tickangle": -45,
            "automargin": True,
        },
        "yaxis2": {
            "anchor": "x2",
            "title": {"text": "contribution to the logit"},
            "zeroline": True,
            "automargin": True,
        },
    }
    return themed_figure(traces, layout, dark=dark)


# --- Memory horizon --------------------------------------------------------------------------


def make_horizon_heatmap(
    loss: np.ndarray,
    k_values: np.ndarray,
    context: np.ndarray,
    full_loss: np.ndarray,
    horizon: np.ndarray,
    str_tokens: Sequence[str],
    *,
    dark: bool = False,
) -> Figure:
    """Loss on each predicted token (across) given only the last k tokens of context (up).

    Cells where ``k`` exceeds the context a prediction has are blank; a dot marks each
    prediction's horizon.

    Args:
        loss: ``[n_k, pos - 1]`` (:attr:`analysis.horizon.MemoryHorizon.loss`).
        k_values: ``[n_k]`` context lengths, ascending.
        context: ``[pos - 1]`` context available to each prediction.
        full_loss: ``[pos - 1]`` full-context loss.
        horizon: ``[pos - 1]`` from :meth:`analysis.horizon.MemoryHorizon.horizon`.
        str_tokens: ``[pos]`` the tokens as text; column ``i`` predicts token ``i + 1``.
        dark: Use the dark template.
    """
    loss = np.asarray(loss, dtype=np.float32)
    k_values = np.asarray(k_values)
    n_k, n_pred = loss.shape
    shown = np.where(k_values[:, None] <= np.asarray(context)[None], loss, np.nan)
    labels = [token_label(pos + 1, str_tokens[pos + 1]) for pos in range(n_pred)]
    ticks = [plotly_text(display_token(str_tokens[pos + 1])) for pos in range(n_pred)]
    excess = shown - np.asarray(full_loss, dtype=np.float32)[None]
    cells = np.stack(
        [
            np.broadcast_to(np.asarray(full_loss, dtype=np.float32)[None], shown.shape),
            excess,
            np.broadcast_to(k_values[:, None], shown.shape).astype(np.float32),
        ],
        -1,
    )
    rows = list(range(n_k))
    heatmap = {
        "type": "heatmap",
        "z": shown,
        "x": labels,
        "y": rows,
        "customdata": cells,
        "colorscale": VALUE_SCALE,
        "colorbar": {"title": {"text": "loss (nats)"}, "thickness": 12, "len": 0.9},
        "hovertemplate": (
            "predicting %{x} from the last %{customdata[2]:d} tokens<br>loss %{z:.3f} nats"
            "<br>full context %{customdata[0]:.3f} (%{customdata[1]:+.3f})<extra></extra>"
        ),
        "hoverongaps": False,
    }
    horizon_rows = np.searchsorted(k_values, np.asarray(horizon), side="left")
    dots = {
        "type": "scatter",
        "mode": "markers",
        "x": labels,
        "y": np.minimum(horizon_rows, n_k - 1),
        "customdata": np.asarray(horizon),
        "marker": {"symbol": "circle", "size": 6, "color": "#ffffff", "line": {"width": 1}},
        "name": "horizon",
        "hovertemplate": "predicting %{x}<br>horizon %{customdata} tokens<extra></extra>",
    }
    every = max(1, math.ceil(n_k / 16))
    layout = {
        "title": _title("Loss on each token with only the last k tokens of context"),
        "height": 380,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": _token_axis(labels, ticks, "predicted token"),
        "yaxis": {
            "tickmode": "array",
            "tickvals": rows[::every],
            "ticktext": [str(int(k)) for k in k_values[::every]],
            "title": {"text": "context k (tokens)"},
            "showgrid": False,
            "zeroline": False,
            "automargin": True,
        },
        "showlegend": False,
    }
    return themed_figure([heatmap, dots], layout, dark=dark)


def make_horizon_curve(
    k_values: np.ndarray, mean_loss: np.ndarray, full_mean: float, *, dark: bool = False
) -> Figure:
    """The loss averaged over every prediction against the context length (log axis).

    Args:
        k_values: ``[n_k]`` context lengths.
        mean_loss: ``[n_k]`` (:attr:`analysis.horizon.MemoryHorizon.mean_loss`).
        full_mean: The full-context mean loss, drawn as a dashed line.
        dark: Use the dark template.
    """
    k_values = np.asarray(k_values, dtype=np.int64)
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= k_values[-1]]
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "x": k_values,
            "y": np.asarray(mean_loss, dtype=np.float32),
            "name": "context capped at k",
            "line": {"color": _accent(dark), "width": 3},
            "hovertemplate": "k = %{x}: %{y:.3f} nats<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "x": [int(k_values[0]), int(k_values[-1])],
            "y": [full_mean, full_mean],
            "name": "full context",
            "line": {"color": "#6c757d", "dash": "dash"},
            "hovertemplate": "full context: %{y:.3f} nats<extra></extra>",
        },
    ]
    layout = {
        "title": _title("Mean loss against context length"),
        "height": 380,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {
            "type": "log",
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [str(k) for k in ticks],
            "title": {"text": "context k (tokens, log scale)"},
        },
        "yaxis": {"title": {"text": "mean loss (nats)"}, "automargin": True},
        # The loss falls as k grows, so the top right corner stays free.
        "legend": {"y": 0.98, "yanchor": "top", "x": 0.98, "xanchor": "right"},
    }
    return themed_figure(traces, layout, dark=dark)


# --- Per-head scores -------------------------------------------------------------------------


def make_head_score_heatmap(
    values: np.ndarray,
    *,
    title: str,
    value_name: str,
    zrange: tuple[float, float] | None = None,
    selected: tuple[int, int] | None = None,
    dark: bool = False,
) -> Figure:
    """One score per head, layers down and heads across; a click gives ``x`` = head and
    ``y`` = layer (:func:`components.heatmaps.parse_panel_click` reads it).

    Args:
        values: ``[n_layers, n_heads]`` (NaN cells blank).
        title: Figure title.
        value_name: The score's name, for the colour bar and hover.
        zrange: ``(zmin, zmax)``; the data's range by default.
        selected: ``(layer, head)`` to frame.
        dark: Use the dark template.
    """
    values = np.asarray(values, dtype=np.float32)
    n_layers, n_heads = values.shape
    zmin, zmax = zrange if zrange else (None, None)
    heatmap = {
        "type": "heatmap",
        "z": values,
        "x": list(range(n_heads)),
        "y": list(range(n_layers)),
        "zmin": zmin,
        "zmax": zmax,
        "colorscale": VALUE_SCALE,
        "colorbar": {"title": {"text": plotly_text(value_name)}, "thickness": 12, "len": 0.9},
        "texttemplate": "%{z:.2f}" if values.size <= SHOW_VALUES_CELLS else None,
        "textfont": {"size": 11},
        "hovertemplate": (
            f"L%{{y}} H%{{x}}<br>{plotly_text(value_name)}: %{{z:.3f}}"
            "<br>click to open on the Attention page<extra></extra>"
        ),
        "hoverongaps": False,
        "xgap": 2,
        "ygap": 2,
    }
    shapes = []
    if selected is not None:
        layer, head = selected
        shapes.append(
            {
                "type": "rect",
                "x0": head - 0.5,
                "x1": head + 0.5,
                "y0": layer - 0.5,
                "y1": layer + 0.5,
                "line": {"color": _accent(dark), "width": 3},
            }
        )
    every_head = max(1, math.ceil(n_heads / 32))
    layout = {
        "title": _title(title),
        "height": max(260, 110 + 34 * n_layers),
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": _head_axis(n_heads, every_head),
        "yaxis": _layer_axis(n_layers),
        "shapes": shapes,
    }
    return themed_figure([heatmap], layout, dark=dark)


def head_table_rows(scores: dict[str, np.ndarray]) -> list[dict]:
    """One row per head, ``{"id": "L1H2", "head": "L1 H2", "layer", "head_index", <score>...}``;
    NaN scores become None (an empty cell that sorts last)."""
    first = next(iter(scores.values()))
    n_layers, n_heads = first.shape
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            row = {"id": f"L{layer}H{head}", "head": f"L{layer} H{head}"}
            row |= {"layer": layer, "head_index": head}
            for name, values in scores.items():
                value = float(values[layer, head])
                row[name] = None if math.isnan(value) else round(value, 4)
            rows.append(row)
    return rows


def make_head_table(table_id: str, score_titles: dict[str, str]) -> dash_table.DataTable:
    """A sortable table of per-head scores (click a row to open the head), coloured by
    Bootstrap's variables so it follows the light/dark mode.

    Args:
        table_id: The component id.
        score_titles: ``{score name: column title}`` in column order.
    """
    columns = [{"id": "head", "name": "head", "type": "text"}]
    columns += [
        {"id": name, "name": title, "type": "numeric", "format": {"specifier": ".3f"}}
        for name, title in score_titles.items()
    ]
    return dash_table.DataTable(
        id=table_id,
        columns=columns,
        data=[],
        sort_action="native",
        page_size=12,
        style_table={"overflowX": "auto"},
        style_header={
            "backgroundColor": "var(--bs-tertiary-bg)",
            "color": "var(--bs-body-color)",
            "fontWeight": "600",
            "whiteSpace": "normal",
            "height": "auto",
        },
        style_data={
            "backgroundColor": "var(--bs-body-bg)",
            "color": "var(--bs-body-color)",
            "border": "1px solid var(--bs-border-color)",
            "cursor": "pointer",
        },
        style_cell={"fontFamily": "var(--bs-font-sans-serif)", "fontSize": "0.85rem"},
    )
