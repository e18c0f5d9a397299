"""Attention figures from numpy arrays: one head, a layer's heads, the whole model, and
layers x heads summaries.

Size on the wire: Plotly sends numpy arrays as base64 typed arrays, about 5.4 bytes per float32
cell once JSON-escaped. Long prompts are therefore shown in blocks of tokens, each cell holding
the largest weight in its block (max keeps thin stripes such as induction or previous-token
diagonals visible, where a mean would wash them out). :data:`MAX_HEAD_SIDE` caps one head view
near 0.8 MB and :data:`OVERVIEW_CELLS` the model overview near 1.6 MB.

Speed: figures are plain dicts (:mod:`components.figures`), never validated by plotly on the
server. Validating a layout that carries a full Bootstrap template costs about 50 ms, more than
the rest of a head switch together; the builders' tests check what validation would catch.
"""

from __future__ import annotations

import math
import re

import numpy as np
from plotly.colors import get_colorscale

from components.figures import Figure, themed_figure
from components.tokens import display_token, plotly_text, token_label

MAX_HEAD_SIDE = 384
MAX_GRID_TILE_SIDE = 96
MAX_OVERVIEW_TILE_SIDE = 64
OVERVIEW_CELLS = 250_000
GRID_COLUMNS = 6
_LABELLED_TICKS = 48  # at most this many token labels per axis


# Colour scales as explicit lists: figures skip Plotly's validation, which would otherwise turn
# names into lists, and plotly.js knows fewer names (and a different "Blues") than plotly.py.
_LIGHT_SCALE = get_colorscale("Blues")
_DARK_SCALE = get_colorscale("Inferno")
_VALUE_SCALE = get_colorscale("Viridis")


def attention_colorscale(dark: bool) -> list:
    """Sequential colour scale whose zero blends with the background of the colour mode."""
    return _DARK_SCALE if dark else _LIGHT_SCALE


def _accent(dark: bool) -> str:
    return "#0dcaf0" if dark else "#dc3545"


# --- Downsampling --------------------------------------------------------------------------


def block_starts(n_pos: int, max_side: int) -> np.ndarray:
    """Start positions of equal blocks (the last may be shorter) so at most ``max_side`` remain.

    Returns:
        ``[n_blocks]`` int starts; ``arange(n_pos)`` when ``n_pos <= max_side``.
    """
    if n_pos < 1 or max_side < 1:
        raise ValueError(f"need n_pos >= 1 and max_side >= 1, got {n_pos} and {max_side}")
    return np.arange(0, n_pos, math.ceil(n_pos / max_side))


def block_max(array: np.ndarray, row_starts: np.ndarray, col_starts: np.ndarray) -> np.ndarray:
    """The largest value of each block of the last two axes.

    Args:
        array: ``[..., rows, cols]``.
        row_starts: Increasing block starts along ``rows``, beginning at 0.
        col_starts: Increasing block starts along ``cols``, beginning at 0.

    Returns:
        ``[..., len(row_starts), len(col_starts)]``.
    """
    reduced = np.maximum.reduceat(array, row_starts, axis=-2)
    return np.maximum.reduceat(reduced, col_starts, axis=-1)


def causal_blocks(starts: np.ndarray, n_pos: int) -> np.ndarray:
    """``[n_blocks, n_blocks]`` bool: True where a (query, key) block holds some key <= query."""
    ends = np.append(starts[1:], n_pos) - 1  # last position of each block
    return starts[None, :] <= ends[:, None]


def downsample_attention(pattern: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Block maxima of ``pattern`` ``[..., pos, pos]`` as float32, NaN above the causal diagonal."""
    blocks = block_max(np.asarray(pattern, dtype=np.float32), starts, starts)
    return np.where(causal_blocks(starts, pattern.shape[-1]), blocks, np.nan).astype(np.float32)


def overview_starts(n_pos: int, n_tiles: int) -> np.ndarray:
    """Block starts of the model overview's thumbnails, so all ``n_tiles`` fit the cell budget."""
    side = int(math.sqrt(OVERVIEW_CELLS / max(n_tiles, 1)))
    return block_starts(n_pos, max(4, min(side, MAX_OVERVIEW_TILE_SIDE)))


def span_label(str_tokens: list[str], start: int, stop: int) -> str:
    """Plotly-safe label of positions ``start..stop-1``: ``12 ·cat`` or ``12–14 ·cat·sat·on``."""
    if stop - start == 1:
        return token_label(start, str_tokens[start])
    text = "".join(display_token(t) for t in str_tokens[start:stop])
    text = text if len(text) <= 24 else text[:23] + "…"
    return f"{start}–{stop - 1} {plotly_text(text)}"


def _span_labels(str_tokens: list[str], starts: np.ndarray) -> list[str]:
    stops = np.append(starts[1:], len(str_tokens))
    return [span_label(str_tokens, int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _tick_text(str_tokens: list[str], start: int) -> str:
    return plotly_text(display_token(str_tokens[start]))


# --- Figures ---------------------------------------------------------------------------------


def _axis_grid(
    rows: int, cols: int, *, h_gap: float, v_gap: float, titles: list[str] | None = None
) -> tuple[dict, list[str], list[dict]]:
    """Axes of a ``rows x cols`` grid of panels, numbered row by row like ``make_subplots``.

    Returns:
        ``(axes, suffixes, annotations)``: layout entries ``xaxis``, ``yaxis2``, ...; the axis
        suffix of each panel (``""``, ``"2"``, ...); and the panel titles as annotations.
    """
    width = (1 - (cols - 1) * h_gap) / cols
    height = (1 - (rows - 1) * v_gap) / rows
    axes, suffixes, annotations = {}, [], []
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        suffix = "" if index == 0 else str(index + 1)
        x0 = col * (width + h_gap)
        y1 = 1 - row * (height + v_gap)
        axes[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "anchor": f"y{suffix}"}
        axes[f"yaxis{suffix}"] = {"domain": [y1 - height, y1], "anchor": f"x{suffix}"}
        suffixes.append(suffix)
        if titles and index < len(titles):
            annotations.append(
                {
                    "text": titles[index],
                    "x": x0 + width / 2,
                    "y": y1,
                    "xref": "paper",
                    "yref": "paper",
                    "xanchor": "center",
                    "yanchor": "bottom",
                    "showarrow": False,
                    "font": {"size": 12},
                }
            )
    return axes, suffixes, annotations


def make_empty_figure(message: str, *, dark: bool = False, height: int = 300) -> Figure:
    """A blank figure that says why it is blank."""
    note = {
        "text": plotly_text(message),
        "showarrow": False,
        "xref": "paper",
        "yref": "paper",
        "x": 0.5,
        "y": 0.5,
        "font": {"size": 14},
    }
    layout = {
        "height": height,
        "xaxis": {"visible": False},
        "yaxis": {"visible": False},
        "margin": {"l": 10, "r": 10, "t": 10, "b": 10},
        "annotations": [note],
    }
    return themed_figure([], layout, dark=dark)


def make_attention_heatmap(
    pattern: np.ndarray,
    str_tokens: list[str],
    *,
    title: str = "",
    dark: bool = False,
    max_side: int = MAX_HEAD_SIDE,
    height: int = 660,
) -> Figure:
    """One head's attention, queries down and keys across, labelled with the tokens.

    Hover shows the query token, the key token and the weight. Prompts longer than ``max_side``
    tokens are shown in blocks of tokens holding the block's largest weight (the title says so).

    Args:
        pattern: ``[q_pos, k_pos]`` attention weights of one head.
        str_tokens: ``[pos]`` the tokens as text.
        title: Figure title (Plotly-escaped here).
        dark: Use the dark template and colour scale.
        max_side: Most cells per side before tokens are grouped into blocks.
        height: Figure height in pixels.
    """
    n_pos = pattern.shape[-1]
    if pattern.shape != (n_pos, n_pos) or len(str_tokens) != n_pos:
        raise ValueError(
            f"pattern {pattern.shape} and {len(str_tokens)} tokens do not match: expected "
            "[pos, pos] and pos tokens"
        )
    starts = block_starts(n_pos, max_side)
    z = downsample_attention(pattern, starts)
    labels = _span_labels(str_tokens, starts)
    blocked = len(starts) < n_pos
    if blocked:
        block = f"blocks of {int(starts[1] - starts[0])} tokens"
        title = f"{title} · {block}" if title else block

    # Label every token when they fit, else an evenly spaced subset.
    every = max(1, math.ceil(len(starts) / _LABELLED_TICKS))
    weight = "max weight in block" if blocked else "weight"
    heatmap = {
        "type": "heatmap",
        "z": z,
        "x": labels,
        "y": labels,
        "zmin": 0.0,
        "zmax": 1.0,
        "colorscale": attention_colorscale(dark),
        "colorbar": {"title": {"text": "weight"}, "thickness": 12, "len": 0.8},
        "hovertemplate": f"query %{{y}}<br>key %{{x}}<br>{weight} %{{z:.3f}}<extra></extra>",
        "hoverongaps": False,
    }
    axis = {
        "type": "category",
        "tickmode": "array",
        "tickvals": labels[::every],
        "ticktext": [_tick_text(str_tokens, int(s)) for s in starts[::every]],
        "tickfont": {"size": 10},
        "showgrid": False,
        "zeroline": False,
        "automargin": True,
    }
    layout = {
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 14}},
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        "xaxis": {**axis, "title": {"text": "key"}, "tickangle": -90},
        "yaxis": {**axis, "title": {"text": "query"}, "autorange": "reversed"},
    }
    return themed_figure([heatmap], layout, dark=dark)


def grid_shape(n_heads: int) -> tuple[int, int]:
    """``(rows, cols)`` of the head grid."""
    cols = min(n_heads, GRID_COLUMNS)
    return math.ceil(n_heads / cols), cols


def grid_selection_shapes(head: int | None, n_heads: int, *, dark: bool = False) -> list[dict]:
    """A frame around ``head``'s tile of :func:`make_head_grid` (none for ``None``)."""
    if head is None or not 0 <= head < n_heads:
        return []
    axis = "" if head == 0 else str(head + 1)
    return [
        {
            "type": "rect",
            "xref": f"x{axis} domain",
            "yref": f"y{axis} domain",
            "x0": -0.03,
            "x1": 1.03,
            "y0": -0.03,
            "y1": 1.03,
            "line": {"color": _accent(dark), "width": 3},
        }
    ]


def make_head_grid(
    patterns: np.ndarray,
    *,
    layer: int,
    selected_head: int | None = None,
    dark: bool = False,
    max_side: int = MAX_GRID_TILE_SIDE,
) -> Figure:
    """Thumbnails of every head in one layer; click data's ``curveNumber`` is the head.

    Args:
        patterns: ``[n_heads, q_pos, k_pos]`` attention of one layer.
        layer: The layer shown (for hover text).
        selected_head: Head to frame, if any.
        dark: Use the dark template and colour scale.
        max_side: Most cells per side of one thumbnail.
    """
    n_heads, n_pos = patterns.shape[0], patterns.shape[-1]
    rows, cols = grid_shape(n_heads)
    starts = block_starts(n_pos, max_side)
    tiles = downsample_attention(patterns, starts)
    blocked = len(starts) < n_pos
    query, key = ("queries from", "keys from") if blocked else ("query", "key")

    axes, suffixes, titles = _axis_grid(
        rows, cols, h_gap=0.03, v_gap=0.12 / rows, titles=[f"H{h}" for h in range(n_heads)]
    )
    traces = [
        {
            "type": "heatmap",
            "z": tiles[head],
            "x": starts,
            "y": starts,
            "xaxis": f"x{suffixes[head]}",
            "yaxis": f"y{suffixes[head]}",
            "coloraxis": "coloraxis",
            "hovertemplate": (
                f"L{layer} H{head}<br>{query} %{{y}}<br>{key} %{{x}}<br>"
                "weight %{z:.3f}<extra></extra>"
            ),
            "hoverongaps": False,
        }
        for head in range(n_heads)
    ]
    for name, axis in axes.items():
        axis.update(showticklabels=False, showgrid=False, zeroline=False)
        if name.startswith("yaxis"):
            axis["autorange"] = "reversed"
    layout = {
        **axes,
        "annotations": titles,
        "coloraxis": {
            "colorscale": attention_colorscale(dark),
            "cmin": 0,
            "cmax": 1,
            "showscale": False,
        },
        "height": 40 + rows * max(110, 330 // cols + 50),
        "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
        "shapes": grid_selection_shapes(selected_head, n_heads, dark=dark),
    }
    return themed_figure(traces, layout, dark=dark)


def _line(x0: float, x1: float, y0: float, y1: float, color: str) -> dict:
    line = {"color": color, "width": 2}
    return {"type": "line", "x0": x0, "x1": x1, "y0": y0, "y1": y1, "line": line}


def overview_shapes(
    n_layers: int,
    n_heads: int,
    tile: int,
    selected: tuple[int, int] | None = None,
    *,
    dark: bool = False,
) -> list[dict]:
    """Shapes of :func:`make_model_overview`: tile separators, then a frame around ``selected``.

    Args:
        n_layers: Rows of tiles.
        n_heads: Columns of tiles.
        tile: Cells per side of one tile.
        selected: ``(layer, head)`` to frame, if any.
        dark: Colour mode (separators take the background colour).
    """
    # Lines in the background colour split the canvas into tiles.
    background = "#212529" if dark else "#ffffff"
    right, bottom = n_heads * tile - 0.5, n_layers * tile - 0.5
    shapes = [
        _line(h * tile - 0.5, h * tile - 0.5, -0.5, bottom, background) for h in range(1, n_heads)
    ]
    shapes += [
        _line(-0.5, right, ly * tile - 0.5, ly * tile - 0.5, background)
        for ly in range(1, n_layers)
    ]
    if selected is not None:
        layer, head = selected
        shapes.append(
            {
                "type": "rect",
                "x0": head * tile - 0.5,
                "x1": (head + 1) * tile - 0.5,
                "y0": layer * tile - 0.5,
                "y1": (layer + 1) * tile - 0.5,
                "line": {"color": _accent(dark), "width": 3},
            }
        )
    return shapes


def make_model_overview(
    thumbnails: np.ndarray,
    starts: np.ndarray,
    *,
    selected: tuple[int, int] | None = None,
    dark: bool = False,
) -> Figure:
    """Every head of every layer as a thumbnail, layers down and heads across.

    One heatmap holds all tiles so the browser draws a single image. Click data carries the
    tile's labels (``"L2 · q40"`` and ``"H3 · k12"``); :func:`parse_overview_click` reads them.

    Args:
        thumbnails: ``[n_layers, n_heads, tile, tile]`` downsampled attention (NaN above the
            diagonal), e.g. from :func:`downsample_attention` with :func:`overview_starts`.
        starts: ``[tile]`` first position of each block.
        selected: ``(layer, head)`` to frame.
        dark: Use the dark template and colour scale.
    """
    n_layers, n_heads, tile = thumbnails.shape[:3]
    canvas = thumbnails.transpose(0, 2, 1, 3).reshape(n_layers * tile, n_heads * tile)
    x_labels = [f"H{h} · k{int(s)}" for h in range(n_heads) for s in starts]
    y_labels = [f"L{layer} · q{int(s)}" for layer in range(n_layers) for s in starts]
    middle = tile // 2

    heatmap = {
        "type": "heatmap",
        "z": canvas,
        "x": x_labels,
        "y": y_labels,
        "zmin": 0.0,
        "zmax": 1.0,
        "colorscale": attention_colorscale(dark),
        "showscale": False,
        "hovertemplate": "%{y} · %{x}<br>max weight %{z:.2f}<extra></extra>",
        "hoverongaps": False,
    }
    axis = {"type": "category", "tickmode": "array", "showgrid": False, "zeroline": False}
    layout = {
        "height": min(900, 60 + n_layers * max(40, 700 // max(n_heads, 1))),
        "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
        "xaxis": {
            **axis,
            "side": "top",
            "tickvals": [x_labels[h * tile + middle] for h in range(n_heads)],
            "ticktext": [f"H{h}" for h in range(n_heads)],
        },
        "yaxis": {
            **axis,
            "autorange": "reversed",
            "tickvals": [y_labels[layer * tile + middle] for layer in range(n_layers)],
            "ticktext": [f"L{layer}" for layer in range(n_layers)],
        },
        "shapes": overview_shapes(n_layers, n_heads, tile, selected, dark=dark),
    }
    return themed_figure([heatmap], layout, dark=dark)


_OVERVIEW_X = re.compile(r"^H(\d+) · k\d+$")
_OVERVIEW_Y = re.compile(r"^L(\d+) · q\d+$")


def parse_overview_click(click_data: object) -> tuple[int, int] | None:
    """``(layer, head)`` of a click on :func:`make_model_overview`, None for anything else."""
    try:
        point = click_data["points"][0]  # type: ignore[index]
        x = _OVERVIEW_X.match(point["x"])
        y = _OVERVIEW_Y.match(point["y"])
    except (TypeError, KeyError, IndexError):
        return None
    if x is None or y is None:
        return None
    return int(y.group(1)), int(x.group(1))


def panel_selection_shapes(
    layer: int | None, head: int | None, n_panels: int, *, dark: bool = False
) -> list[dict]:
    """A frame around the ``(layer, head)`` cell in each panel of :func:`make_layer_head_panels`."""
    if layer is None or head is None:
        return []
    return [
        {
            "type": "rect",
            "xref": "x" if panel == 0 else f"x{panel + 1}",
            "yref": "y" if panel == 0 else f"y{panel + 1}",
            "x0": head - 0.5,
            "x1": head + 0.5,
            "y0": layer - 0.5,
            "y1": layer + 0.5,
            "line": {"color": _accent(dark), "width": 3},
        }
        for panel in range(n_panels)
    ]


def make_layer_head_panels(
    panels: list[tuple[str, np.ndarray]],
    *,
    selected: tuple[int, int] | None = None,
    dark: bool = False,
    ranges: list[tuple[float, float] | None] | None = None,
    columns: int | None = None,
) -> Figure:
    """Side-by-side layers x heads heatmaps of per-head numbers; click ``x`` is the head and
    ``y`` the layer.

    Args:
        panels: ``(title, values)`` pairs; ``values`` is ``[n_layers, n_heads]``, NaN allowed.
        selected: ``(layer, head)`` to frame in every panel.
        dark: Use the dark template.
        ranges: Per panel ``(zmin, zmax)``, or None to fit the data.
        columns: Panels per row (all in one row by default).
    """
    n_layers, n_heads = panels[0][1].shape
    ranges = ranges or [None] * len(panels)
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    show_numbers = n_layers * n_heads <= 64
    axes, suffixes, titles = _axis_grid(
        rows,
        columns,
        h_gap=0.08,
        v_gap=0.35 / rows if rows > 1 else 0.0,
        titles=[plotly_text(title) for title, _ in panels],
    )
    traces = []
    for suffix, (title, values), z_range in zip(suffixes, panels, ranges, strict=False):
        zmin, zmax = z_range if z_range else (None, None)
        traces.append(
            {
                "type": "heatmap",
                "z": np.asarray(values, dtype=np.float32),
                "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "zmin": zmin,
                "zmax": zmax,
                "colorscale": _VALUE_SCALE,
                "showscale": False,
                "texttemplate": "%{z:.2f}" if show_numbers else None,
                "textfont": {"size": 10},
                "hovertemplate": (
                    f"L%{{y}} H%{{x}}<br>{plotly_text(title)}: %{{z:.3f}}<extra></extra>"
                ),
                "hoverongaps": False,
            }
        )
    for name, axis in axes.items():
        count = n_heads if name.startswith("xaxis") else n_layers
        prefix = "H" if name.startswith("xaxis") else "L"
        axis.update(
            tickmode="array",
            tickvals=list(range(count)),
            ticktext=[f"{prefix}{index}" for index in range(count)],
            showgrid=False,
            zeroline=False,
        )
        if name.startswith("yaxis"):
            axis["autorange"] = "reversed"
    layout = {
        **axes,
        "annotations": titles,
        "height": rows * (60 + 26 * max(n_layers, 4)) + 20,
        "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
        "shapes": panel_selection_shapes(*(selected or (None, None)), len(panels), dark=dark),
    }
    return themed_figure(traces, layout, dark=dark)


def parse_panel_click(click_data: object) -> tuple[int, int] | None:
    """``(layer, head)`` of a click on :func:`make_layer_head_panels`, None for anything else."""
    try:
        point = click_data["points"][0]  # type: ignore[index]
        return int(point["y"]), int(point["x"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None
