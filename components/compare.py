"""Figures and widgets of the Compare page: differences, patching results and prompt-set tables.

Every builder takes numpy arrays and plain Python values. Differences and patching results are
signed, so they use a diverging colour scale centred on zero (blue where the first operand is
larger, red where it is smaller), with a symmetric range so that equal magnitudes look equal.
Token labels reach Plotly only through :func:`components.tokens.plotly_text`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from dash import dash_table, html
from plotly.colors import diverging, make_colorscale

from components.figures import Figure, themed_figure
from components.heatmaps import block_starts, causal_blocks
from components.tokens import display_token, plotly_text

# Red below zero, blue above. Given as colours, not as the name "RdBu": plotly.js's own
# "RdBu" runs the other way round from plotly.py's, and these figures skip plotly.py's lookup.
_LIGHT_DIVERGING = make_colorscale(list(diverging.RdBu))
# In dark mode zero is the page's background, so unchanged cells do not glare.
_DARK_DIVERGING = [
    [0.0, "rgb(244,109,67)"],
    [0.25, "rgb(165,60,45)"],
    [0.5, "rgb(33,37,41)"],
    [0.75, "rgb(38,98,150)"],
    [1.0, "rgb(116,173,209)"],
]
SEQUENTIAL_COLORSCALE = "Viridis"
MIN_DIFFERENCE_RANGE = 0.05  # colour range of an attention difference is at least ±this
MAX_DIFFERENCE_SIDE = 256  # cells per side of an attention-difference view before blocking
LABELLED_TICKS = 48  # at most this many token labels per axis
MAX_BAD_ROWS_SHOWN = 20
SHOW_VALUES_CELLS = 64  # print each cell's value when a heatmap has at most this many cells


# --- Arrays ----------------------------------------------------------------------------------


def signed_block_extreme(
    array: np.ndarray, row_starts: np.ndarray, col_starts: np.ndarray
) -> np.ndarray:
    """The value of largest magnitude in each block of the last two axes, sign kept.

    A block maximum would hide negative differences; this keeps the strongest change of either
    sign visible when a long prompt is shown in blocks. NaN cells are ignored (all-NaN blocks
    stay NaN).

    Args:
        array: ``[..., rows, cols]``.
        row_starts: Increasing block starts along ``rows``, beginning at 0.
        col_starts: Increasing block starts along ``cols``, beginning at 0.

    Returns:
        ``[..., len(row_starts), len(col_starts)]`` float32.
    """
    array = np.asarray(array, dtype=np.float32)
    high = np.nan_to_num(array, nan=-np.inf)
    low = np.nan_to_num(array, nan=np.inf)
    high = np.maximum.reduceat(np.maximum.reduceat(high, row_starts, -2), col_starts, -1)
    low = np.minimum.reduceat(np.minimum.reduceat(low, row_starts, -2), col_starts, -1)
    extreme = np.where(np.abs(low) > np.abs(high), low, high)
    return np.where(np.isfinite(extreme), extreme, np.nan).astype(np.float32)


def diverging_colorscale(dark: bool) -> list:
    """Red for negative, blue for positive, zero the colour of the page background."""
    return _DARK_DIVERGING if dark else _LIGHT_DIVERGING


def symmetric_range(*arrays: np.ndarray, floor: float = 0.0) -> float:
    """The largest finite magnitude in ``arrays`` (at least ``floor``; 1.0 when all are empty)."""
    peaks = [float(np.nanmax(np.abs(a))) for a in arrays if np.isfinite(a).any()]
    peak = max([floor, *peaks])
    return peak if peak > 0 else 1.0


def pair_axis_labels(
    str_tokens_a: Sequence[str], str_tokens_b: Sequence[str], pairs: Sequence[Sequence[int]]
) -> tuple[list[str], list[str]]:
    """Unique axis labels and short tick texts for aligned pairs of positions.

    Returns:
        ``(labels, ticks)``: ``"3 ·cat"`` where both prompts hold the token at the same position,
        ``"3|5 ·cat"`` where the positions differ, ``"3 ·cat | ·dog"`` where the tokens differ;
        ticks drop the positions.
    """
    labels, ticks = [], []
    for i, j in pairs:
        a, b = display_token(str_tokens_a[i]), display_token(str_tokens_b[j])
        text = a if a == b else f"{a} | {b}"
        where = str(i) if i == j else f"{i}|{j}"
        labels.append(f"{where} {plotly_text(text)}")
        ticks.append(plotly_text(text))
    return labels, ticks


def token_axis_labels(str_tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(labels, ticks)`` for one prompt's positions: ``"12 ·cat"`` and ``"·cat"``."""
    ticks = [plotly_text(display_token(t)) for t in str_tokens]
    return [f"{pos} {tick}" for pos, tick in enumerate(ticks)], ticks


# --- Figures ---------------------------------------------------------------------------------


def _category_axis(labels: list[str], ticks: list[str], title: str) -> dict:
    """A category axis labelled with ``ticks``, every one when they fit, else a subset."""
    every = max(1, math.ceil(len(labels) / LABELLED_TICKS))
    return {
        "type": "category",
        "tickmode": "array",
        "tickvals": labels[::every],
        "ticktext": ticks[::every],
        "tickfont": {"size": 10},
        "showgrid": False,
        "zeroline": False,
        "automargin": True,
        "title": {"text": title},
    }


def make_value_heatmap(
    z: np.ndarray,
    x: tuple[list[str], list[str]],
    y: tuple[list[str], list[str]],
    *,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    signed: bool = False,
    zrange: tuple[float, float] | None = None,
    colorbar_title: str = "",
    value_name: str = "value",
    dark: bool = False,
    height: int = 420,
    shapes: list[dict] | None = None,
    show_values: bool = False,
) -> Figure:
    """A labelled heatmap of any ``[rows, cols]`` array (NaN cells blank).

    Args:
        z: ``[rows, cols]`` values.
        x: ``(labels, ticks)`` of the columns (labels unique, Plotly-escaped).
        y: ``(labels, ticks)`` of the rows, top to bottom.
        title: Figure title (escaped here).
        x_title: Column axis title.
        y_title: Row axis title.
        signed: Diverging colours centred on 0 with a symmetric range.
        zrange: ``(zmin, zmax)``; by default the data's range (symmetric when ``signed``).
        colorbar_title: Title of the colour bar.
        value_name: What a cell holds, for the hover text.
        dark: Use the dark template.
        height: Figure height in pixels.
        shapes: Extra layout shapes (a highlighted row or column).
        show_values: Print each value in its cell (only when there are at most
            :data:`SHOW_VALUES_CELLS` cells, so the numbers stay legible).
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape != (len(y[0]), len(x[0])):
        raise ValueError(
            f"values of shape {z.shape} do not match {len(y[0])} row and {len(x[0])} column labels"
        )
    if zrange is None and signed:
        peak = symmetric_range(z)
        zrange = (-peak, peak)
    zmin, zmax = zrange if zrange else (None, None)
    heatmap = {
        "type": "heatmap",
        "z": z,
        "x": x[0],
        "y": y[0],
        "zmin": zmin,
        "zmax": zmax,
        "zmid": 0.0 if signed else None,
        "colorscale": diverging_colorscale(dark) if signed else SEQUENTIAL_COLORSCALE,
        "colorbar": {"title": {"text": plotly_text(colorbar_title)}, "thickness": 12},
        "hovertemplate": (
            f"{plotly_text(y_title)} %{{y}}<br>{plotly_text(x_title)} %{{x}}<br>"
            f"{plotly_text(value_name)} %{{z:.3f}}<extra></extra>"
        ),
        "hoverongaps": False,
    }
    if show_values and z.size <= SHOW_VALUES_CELLS:
        heatmap |= {"texttemplate": "%{z:.2f}", "textfont": {"size": 10}}
    layout = {
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 13}},
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 36 if title else 10, "b": 10},
        "xaxis": {**_category_axis(*x, x_title), "tickangle": -90},
        "yaxis": {**_category_axis(*y, y_title), "autorange": "reversed"},
        "shapes": shapes or [],
    }
    return themed_figure([heatmap], layout, dark=dark)


def highlight_shape(axis: str, index: int, *, dark: bool = False) -> dict:
    """A frame around row (``axis="y"``) or column (``axis="x"``) ``index`` of a heatmap."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    color = "#0dcaf0" if dark else "#dc3545"
    other = "y" if axis == "x" else "x"
    shape = {"type": "rect", "line": {"color": color, "width": 2}, "fillcolor": "rgba(0,0,0,0)"}
    shape |= {f"{axis}ref": axis, f"{axis}0": index - 0.5, f"{axis}1": index + 0.5}
    shape |= {f"{other}ref": f"{other} domain", f"{other}0": 0, f"{other}1": 1}
    return shape


def block_index(position: int, n_pos: int, max_side: int) -> int:
    """The row of a blocked view (see :func:`components.heatmaps.block_starts`) holding
    ``position``."""
    starts = block_starts(n_pos, max_side)
    return int(np.searchsorted(starts, position, side="right") - 1)


def make_attention_difference(
    difference: np.ndarray,
    labels: tuple[list[str], list[str]],
    *,
    title: str = "",
    dark: bool = False,
    height: int = 420,
    selected_pair: int | None = None,
    max_side: int = MAX_DIFFERENCE_SIDE,
) -> Figure:
    """One head's attention of A minus B on aligned queries (down) and keys (across).

    Cells above the diagonal are blank: with pairs increasing in both prompts they are future
    keys in both, where attention is zero on each side. Long alignments are shown in blocks
    holding the change of largest magnitude. Colours span the largest change (at least
    :data:`MIN_DIFFERENCE_RANGE`), so the colour bar gives the scale.

    Args:
        difference: ``[n_pairs, n_pairs]`` from :func:`analysis.compare.attention_difference`.
        labels: ``(labels, ticks)`` of the pairs (:func:`pair_axis_labels`).
        title: Figure title.
        dark: Use the dark template.
        height: Figure height in pixels.
        selected_pair: Query row to frame, if any.
        max_side: Most cells per side before pairs are grouped into blocks.
    """
    n_pairs = difference.shape[-1]
    if n_pairs == 0:
        raise ValueError("nothing to show: the alignment paired no tokens")
    starts = block_starts(n_pairs, max_side)
    shown = signed_block_extreme(difference, starts, starts)
    shown = np.where(causal_blocks(starts, n_pairs), shown, np.nan)
    if len(starts) < n_pairs:
        title = f"{title} · blocks of {int(starts[1])} pairs, strongest change shown"
        labels = ([labels[0][s] for s in starts], [labels[1][s] for s in starts])
    # Fit the colours to the largest change, but never stretch noise below MIN_DIFFERENCE_RANGE.
    peak = symmetric_range(shown, floor=MIN_DIFFERENCE_RANGE)
    shapes = []
    if selected_pair is not None and 0 <= selected_pair < n_pairs:
        shapes = [highlight_shape("y", block_index(selected_pair, n_pairs, max_side), dark=dark)]
    return make_value_heatmap(
        shown,
        labels,
        labels,
        title=title,
        x_title="key",
        y_title="query",
        signed=True,
        zrange=(-peak, peak),
        colorbar_title="A − B",
        value_name="A − B",
        dark=dark,
        height=height,
        shapes=shapes,
    )


def make_patching_heatmap(
    values: np.ndarray,
    axis_names: tuple[str, str],
    *,
    pos_labels: tuple[list[str], list[str]],
    title: str = "",
    dark: bool = False,
) -> Figure:
    """A patching sweep: 0 is the corrupted run, 1 the clean run (blue restores, red hurts).

    Args:
        values: ``[rows, cols]`` normalised results (``PatchingResult.values``).
        axis_names: Names of the two axes: ``layer``, ``pos`` or ``head``.
        pos_labels: ``(labels, ticks)`` of the positions (:func:`pair_axis_labels` with the
            identity pairs shows both prompts' tokens where they differ).
        title: Figure title.
        dark: Use the dark template.
    """
    values = np.asarray(values, dtype=np.float32)

    def axis(name: str, count: int) -> tuple[list[str], list[str]]:
        if name == "pos":
            return pos_labels
        prefix = "L" if name == "layer" else "H"
        names = [f"{prefix}{index}" for index in range(count)]
        return names, names

    rows, cols = values.shape
    peak = symmetric_range(values, floor=1.0)
    # Room for the rotated token labels under a position axis, then a band per row.
    height = min(700, (170 if axis_names[1] == "pos" else 90) + max(28 * rows, 120))
    return make_value_heatmap(
        values,
        axis(axis_names[1], cols),
        axis(axis_names[0], rows),
        title=title,
        x_title="position" if axis_names[1] == "pos" else axis_names[1],
        y_title="position" if axis_names[0] == "pos" else axis_names[0],
        signed=True,
        zrange=(-peak, peak),
        colorbar_title="restored",
        value_name="restored (0 corrupted, 1 clean)",
        dark=dark,
        height=height,
        show_values=True,
    )


def make_measure_chart(
    rows: list[dict],
    column: str,
    name: str,
    *,
    dark: bool = False,
) -> Figure:
    """One bar per prompt (``line N`` on the axis) of the measure ``column``; the hover shows
    the prompt.

    Args:
        rows: Table rows with ``line``, ``prompt`` and ``column`` (None where it does not apply).
        column: The measure's key in each row.
        name: The measure's display name.
        dark: Use the dark template.
    """
    lines = [f"line {row['line']}" for row in rows]
    values = [row.get(column) for row in rows]
    prompts = [plotly_text(_shorten(row["prompt"], 80)) for row in rows]
    bars = {
        "type": "bar",
        "x": lines,
        "y": [np.nan if v is None else float(v) for v in values],
        "customdata": prompts,
        "hovertemplate": (
            f"%{{x}}: %{{customdata}}<br>{plotly_text(name)} %{{y:.3f}}<extra></extra>"
        ),
        "marker": {"color": "#0d6efd"},
    }
    layout = {
        "height": 320,
        "margin": {"l": 10, "r": 10, "t": 36, "b": 10},
        "title": {"text": plotly_text(name), "x": 0, "xanchor": "left", "font": {"size": 13}},
        "xaxis": {"type": "category", "automargin": True, "tickangle": -45},
        "yaxis": {"automargin": True, "title": {"text": plotly_text(name)}},
    }
    return themed_figure([bars], layout, dark=dark)


def _shorten(text: str, limit: int) -> str:
    text = display_token(text.replace("\n", " "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- Widgets ---------------------------------------------------------------------------------


def table_columns(columns: Sequence[dict]) -> list[dict]:
    """DataTable columns from ``{"id", "name", "type"}`` dicts; numbers shown to 3 decimals."""
    result = []
    for column in columns:
        entry = {"id": column["id"], "name": column["name"]}
        if column["type"] == "numeric":
            entry |= {"type": "numeric", "format": {"specifier": ".3~f"}}
        else:
            entry["type"] = "text"
        result.append(entry)
    return result


def make_measure_table(table_id: str) -> dash_table.DataTable:
    """An empty sortable table for prompt-set measures, coloured by Bootstrap's variables so it
    follows the light/dark mode."""
    return dash_table.DataTable(
        id=table_id,
        columns=[],
        data=[],
        sort_action="native",
        page_size=15,
        style_table={"overflowX": "auto"},
        style_header={
            "backgroundColor": "var(--bs-tertiary-bg)",
            "color": "var(--bs-body-color)",
            "fontWeight": "600",
            "whiteSpace": "normal",
        },
        style_data={
            "backgroundColor": "var(--bs-body-bg)",
            "color": "var(--bs-body-color)",
            "border": "1px solid var(--bs-border-color)",
        },
        style_cell={"fontFamily": "var(--bs-font-sans-serif)", "fontSize": "0.85rem"},
        style_cell_conditional=[
            {
                "if": {"column_id": "prompt"},
                "maxWidth": "28rem",
                "overflow": "hidden",
                "textOverflow": "ellipsis",
                "textAlign": "left",
                "fontFamily": "var(--bs-font-monospace)",
            }
        ],
        tooltip_delay=300,
        tooltip_duration=None,
    )


def make_bad_rows_list(bad_rows: Sequence[dict]) -> html.Div:
    """``line N: reason`` for each skipped row, the first :data:`MAX_BAD_ROWS_SHOWN` of them."""
    shown = bad_rows[:MAX_BAD_ROWS_SHOWN]
    items = [html.Li(f"line {row['line']}: {row['reason']}") for row in shown]
    if len(bad_rows) > len(shown):
        items.append(html.Li(f"… and {len(bad_rows) - len(shown)} more"))
    noun = "row was" if len(bad_rows) == 1 else "rows were"
    return html.Div(
        [
            html.Div(f"{len(bad_rows)} {noun} skipped; the others ran.", className="fw-semibold"),
            html.Ul(items, className="mb-0 small"),
        ]
    )
