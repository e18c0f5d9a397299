"""Reading the figures the app builds, in tests."""

from __future__ import annotations

import plotly.graph_objects as go

from components.figures import unpack_arrays


def as_figure(figure: dict | go.Figure) -> go.Figure:
    """A builder's or a callback's figure as a *validated* ``go.Figure``.

    The app sends figure dicts that plotly never validates on the server (see
    ``components/figures.py``); here plotly raises ValueError on any unknown or invalid
    property, so every test that reads a figure also checks that it is a valid one.
    """
    if not isinstance(figure, dict | go.Figure):
        raise TypeError(f"expected a figure dict, got {type(figure).__name__}")
    if isinstance(figure, go.Figure):
        return go.Figure(figure)
    return go.Figure(unpack_arrays(figure))


def colorscales(figure: dict) -> list:
    """Every colour scale a figure dict sets, on its traces and colour axes, as sent."""
    scales = [trace["colorscale"] for trace in figure["data"] if "colorscale" in trace]
    layout = figure["layout"]
    for axis in (key for key in layout if key.startswith("coloraxis")):
        if "colorscale" in layout[axis]:
            scales.append(layout[axis]["colorscale"])
    return scales
