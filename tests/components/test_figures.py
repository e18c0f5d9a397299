"""Figure dicts: packed as plotly would pack them, and unpacked back to the same arrays."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
from dash._utils import to_json

from components.figures import as_plotly, pack_arrays, themed_figure, typed_array, unpack_arrays
from components.heatmaps import make_attention_heatmap
from tests.figures import as_figure

ARRAYS = {
    "float32 matrix with gaps": np.array([[0.5, np.nan], [0.25, 1.0]], dtype=np.float32),
    "float64": np.linspace(0, 1, 5),
    "int64 that fits a byte": np.array([0, 3, 127], dtype=np.int64),
    "int64 that needs 32 bits": np.array([-1, 70_000], dtype=np.int64),
    "uint16": np.array([1, 65535], dtype=np.uint16),
    "3-d": np.arange(24, dtype=np.int32).reshape(2, 3, 4),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_packed_arrays_unpack_to_the_same_values(name):
    array = ARRAYS[name]

    back = unpack_arrays(json.loads(json.dumps(pack_arrays({"z": array}))))["z"]

    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_what_plotly_js_cannot_take_as_a_typed_array_goes_as_a_list():
    assert typed_array(np.array(["a", "b"])) == ["a", "b"]
    assert typed_array(np.array([True, False])) == [True, False]
    assert typed_array(np.zeros(0, dtype=np.float32)) == []
    assert typed_array(np.array([2**40], dtype=np.int64))["dtype"] == "f8"
    assert typed_array(np.ones(2, dtype=np.float16))["dtype"] == "f4"
    packed = pack_arrays({"range": np.array([0.0, 1.0]), "n": np.int64(3), "t": (1, 2)})
    assert packed == {"range": [0.0, 1.0], "n": 3, "t": [1, 2]}


def test_a_figure_dict_goes_to_the_browser_as_plotlys_own_figure_would():
    rng = np.random.default_rng(0)
    traces = [
        {"type": "heatmap", "z": rng.random((3, 4)).astype(np.float32), "x": list("abcd")},
        {"type": "scatter", "y": np.array([1, 2, 3], dtype=np.int64), "customdata": rng.random(3)},
    ]
    layout = {"title": {"text": "t"}, "xaxis": {"range": np.array([0.0, 3.0])}}

    ours = json.loads(to_json(themed_figure(traces, layout, dark=False)))
    plotlys = json.loads(to_json(go.Figure(traces, layout=layout)))

    assert ours["data"] == plotlys["data"]
    assert ours["layout"]["xaxis"] == plotlys["layout"]["xaxis"]


def test_the_template_is_a_fresh_copy_in_every_figure():
    first = themed_figure([], {}, dark=True)
    first["layout"]["template"]["layout"]["font"] = {"color": "red"}

    second = themed_figure([], {}, dark=True)

    assert second["layout"]["template"]["layout"].get("font") != {"color": "red"}


def test_a_builders_dict_becomes_the_plotly_figure_it_describes():
    pattern = np.tril(np.full((3, 3), 0.5, dtype=np.float32))
    figure = make_attention_heatmap(pattern, ["a", "b", "c"])

    for plotly_figure in (as_plotly(figure), as_figure(figure)):
        z = np.asarray(plotly_figure.data[0].z, dtype=np.float32)
        np.testing.assert_array_equal(np.tril(z), pattern)
        assert np.isnan(z[0, 1])
    converted = as_plotly(figure)
    assert as_plotly(converted) is converted  # a go.Figure passes through as it is
