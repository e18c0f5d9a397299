"""Figures as plain dicts: the form ``dcc.Graph`` takes, and the cheapest one to send.

A ``go.Figure`` costs a head switch more than everything else it does. Even unvalidated, plotly
builds its object tree from the dicts, copies the layout (template included) on the way in, and
again in ``to_plotly_json`` when Dash serialises the answer: under the load bench (50 users on
2 cores) py-spy put about a quarter of a web worker's busy time there. The figure builders in
:mod:`components` therefore return ``{"data": [...], "layout": {...}}`` dicts.

Numpy arrays in those dicts are packed here as plotly.js typed arrays (``{"dtype", "bdata",
"shape"}``, base64), as plotly does for a ``go.Figure``: Dash's encoder would otherwise write
each number out as text. They come back from the browser in the same form, so
:func:`unpack_arrays` serves both the tests and the downloads.

Code that wants plotly's object API wraps a dict in ``go.Figure``: the export formats do, with
:func:`as_plotly`, and the tests do with validation on, so an invalid property fails there.
"""

from __future__ import annotations

import base64
import copy
import functools

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from components.shell import figure_template

Figure = dict  # {"data": [trace dicts], "layout": layout dict}

# numpy dtype -> plotly.js typed-array code, and back (little-endian, as plotly.js reads them).
_CODES = {
    np.dtype(np.int8): "i1",
    np.dtype(np.uint8): "u1",
    np.dtype(np.int16): "i2",
    np.dtype(np.uint16): "u2",
    np.dtype(np.int32): "i4",
    np.dtype(np.uint32): "u4",
    np.dtype(np.float32): "f4",
    np.dtype(np.float64): "f8",
}
_DTYPES = {code: dtype.newbyteorder("<") for dtype, code in _CODES.items()} | {
    "u1c": np.dtype("<u1")
}
# plotly.js takes these as plain lists only (plotly.py leaves them unpacked too).
_PLAIN_KEYS = frozenset({"range", "geojson", "layer", "layers"})


def _narrow(array: np.ndarray) -> np.ndarray:
    """64-bit integers, which plotly.js has no typed array for, in the smallest type that fits
    (float64 when none does); float16 as float32."""
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind not in "iu" or array.dtype.itemsize < 8:
        return array
    low, high = int(array.min()), int(array.max())
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype)
    return array.astype(np.float64)


def typed_array(array: np.ndarray) -> dict | list:
    """A numeric numpy array as a plotly.js typed array; any other array as a list."""
    if array.size == 0 or array.dtype.kind not in "iuf":
        return array.tolist()
    array = _narrow(array)
    packed = {
        "dtype": _CODES[array.dtype],
        "bdata": base64.b64encode(
            np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        ).decode("ascii"),
    }
    if array.ndim > 1:
        packed["shape"] = ", ".join(str(side) for side in array.shape)
    return packed


def pack_arrays(value):
    """``value`` (dicts, lists and tuples, as a figure is) with every numpy array packed by
    :func:`typed_array`; the containers are new, the leaves shared."""
    if isinstance(value, dict):
        return {
            key: item.tolist()
            if key in _PLAIN_KEYS and isinstance(item, np.ndarray)
            else pack_arrays(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [pack_arrays(item) for item in value]
    if isinstance(value, np.ndarray):
        return typed_array(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def unpack_arrays(value):
    """``value`` with every plotly.js typed array (``{"dtype", "bdata", "shape"}``) as numpy."""
    if isinstance(value, dict):
        if isinstance(value.get("bdata"), str) and value.get("dtype") in _DTYPES:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=_DTYPES[value["dtype"]])
            shape = value.get("shape")
            if isinstance(shape, str):
                shape = [int(part) for part in shape.split(",") if part.strip()]
            return array.reshape(shape) if shape else array
        return {key: unpack_arrays(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unpack_arrays(item) for item in value]
    return value


@functools.cache
def _template(name: str) -> dict:
    return pio.templates[name].to_plotly_json()


def template_layout(dark: bool | None) -> dict:
    """The colour mode's figure template as a layout dict, a fresh copy for each figure."""
    return copy.deepcopy(_template(figure_template(dark)))


def themed_figure(traces: list[dict], layout: dict, *, dark: bool | None) -> Figure:
    """A figure dict from trace and layout dicts, with the colour mode's template and every
    numpy array packed for the browser."""
    figure = pack_arrays({"data": traces, "layout": layout})
    figure["layout"]["template"] = template_layout(dark)
    return figure


def as_plotly(figure: Figure | go.Figure) -> go.Figure:
    """``figure`` as a ``go.Figure`` with numpy arrays, unvalidated: what plotly.js would draw,
    for export."""
    if isinstance(figure, go.Figure):
        return figure
    return go.Figure(unpack_arrays(figure), _validate=False)
