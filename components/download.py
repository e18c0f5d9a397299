"""Download controls: a small toolbar under any figure, and a report-bundle button for a page.

:func:`make_figure_download` puts a format picker (PNG, SVG, HTML, CSV, NPZ), an image-scale
picker and a Download button under a ``dcc.Graph``. Every toolbar of every page is served by the
same two pattern-matching callbacks, registered once when this module is imported:

1. in the browser, a click copies the graph's current figure (as the Dash renderer holds it,
   with every ``Patch`` applied), the chosen format and scale, and the page's address into the
   toolbar's request store. A ``MATCH`` callback cannot name a graph whose id is a plain string
   as its ``State``, and the pages keep plain ids, so the copy is made in the browser;
2. on the server, :func:`figure_download` turns that request into a ``dcc.Download`` payload with
   :func:`components.export.send_figure`, or into a message shown next to the button. It never
   raises: a missing Chromium, an empty figure or a bad format become the message, not a 500.

:func:`make_report_download` and :func:`register_report_download` give a page a "Report (ZIP)"
button that builds a report bundle (:func:`components.export.send_bundle`) of its analysis.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import parse_qs

import dash_bootstrap_components as dbc
import plotly.graph_objects as go
from dash import MATCH, Input, Output, State, callback, clientside_callback, dcc, html, no_update

from analysis.bundle import slug
from components.export import (
    DEFAULT_SCALE,
    FORMATS,
    IMAGE_FORMATS,
    ExportUnavailableError,
    Report,
    send_bundle,
    send_figure,
)
from components.figures import as_plotly
from components.url_state import as_index, clip

logger = logging.getLogger(__name__)

# Pattern-matching id types of the figure toolbar; each id is {"type": ..., "graph": <key>}.
FORMAT_TYPE = "figure-download-format"
SCALE_TYPE = "figure-download-scale"
BUTTON_TYPE = "figure-download-button"
REQUEST_TYPE = "figure-download-request"
FILE_TYPE = "figure-download-file"
MESSAGE_TYPE = "figure-download-message"

SCALES = (1, 2, 3, 4)
# On-screen widths (CSS pixels) an image may take from the page; others get the default.
_WIDTHS = range(200, 4001)
DEFAULT_FORMAT = "png"
# A refusal quoted next to the button is cut here.
MAX_MESSAGE_CHARS = 300
# URL query keys that name what a figure shows, in file-name order, with their prefixes.
_NAME_KEYS = (("layer", "L"), ("head", "H"), ("score", ""), ("metric", ""))


# --- Figure toolbar ----------------------------------------------------------------------------


def graph_key(graph_id: str | dict) -> str:
    """The toolbar's name for ``graph_id``: the id itself, or a dict id as Dash writes it.

    Pattern-matching id values cannot be dicts, so a dict id is stored as sorted, compact JSON,
    the form of ``dash_component_api.stringifyId`` for ids without wildcards.
    """
    if isinstance(graph_id, dict):
        return json.dumps(graph_id, sort_keys=True, separators=(",", ":"))
    if not isinstance(graph_id, str) or not graph_id:
        raise ValueError(f"a figure download needs the graph's id, got {graph_id!r}")
    return graph_id


def toolbar_id(kind: str, graph_id: str | dict) -> dict:
    """The id of one part (``FORMAT_TYPE``, ``BUTTON_TYPE``, ...) of ``graph_id``'s toolbar."""
    return {"type": kind, "graph": graph_key(graph_id)}


def make_figure_download(graph_id: str | dict, *, fmt: str = DEFAULT_FORMAT) -> html.Div:
    """A compact, right-aligned toolbar that downloads the figure of ``graph_id``.

    Place it next to the ``dcc.Graph`` (outside any ``dcc.Loading`` around the graph, so the
    toolbar does not flash while the figure redraws). The file is named after the graph id and
    the model, layer and head in the page's address.

    Args:
        graph_id: The ``dcc.Graph``'s id, a string or a dict.
        fmt: Format chosen at first, one of :data:`components.export.FORMATS`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown download format {fmt!r}; choose one of {', '.join(FORMATS)}")
    formats = [{"label": name.upper(), "value": name} for name in FORMATS]
    scales = [{"label": f"{scale}×", "value": str(scale)} for scale in SCALES]
    return html.Div(
        [
            html.Small(
                id=toolbar_id(MESSAGE_TYPE, graph_id),
                className="text-danger text-end",
                role="status",
            ),
            dbc.InputGroup(
                [
                    dbc.Select(
                        id=toolbar_id(FORMAT_TYPE, graph_id),
                        options=formats,
                        value=fmt,
                        style={"width": "5.4rem"},
                    ),
                    dbc.Select(
                        id=toolbar_id(SCALE_TYPE, graph_id),
                        options=scales,
                        value=str(int(DEFAULT_SCALE)),
                        disabled=fmt not in IMAGE_FORMATS,
                        style={"width": "4.4rem"},
                    ),
                    dbc.Button(
                        "Download",
                        id=toolbar_id(BUTTON_TYPE, graph_id),
                        color="secondary",
                        outline=True,
                        n_clicks=0,
                    ),
                ],
                size="sm",
                class_name="w-auto flex-nowrap",
            ),
            dcc.Store(id=toolbar_id(REQUEST_TYPE, graph_id)),
            dcc.Download(id=toolbar_id(FILE_TYPE, graph_id)),
        ],
        className="ml-figure-download d-flex align-items-center justify-content-end gap-2 mt-1",
        title="Download this figure: choose the format (and the scale of PNG and SVG images)",
    )


def figure_from_state(figure: object) -> go.Figure:
    """A graph's ``figure`` as the browser sent it back, as a plotly figure with numpy arrays.

    Raises:
        ValueError: No figure, or one with no data to save (a placeholder).
    """
    if not isinstance(figure, dict):
        raise ValueError("there is no figure here to download yet")
    if not figure.get("data"):
        raise ValueError("this figure is still empty: analyse or run something first")
    # Unvalidated, like the figures the app builds: what plotly.js drew is what gets saved.
    return as_plotly(figure)


def download_filename(graph: str, search: str | None = None) -> str:
    """``memlens-<graph>[-<model>][-L<layer>][-H<head>]...`` from the graph key and page query.

    Args:
        graph: The toolbar's graph key (:func:`graph_key`); a dict id contributes its values.
        search: The page's query string (``?model=…&layer=…``), as in the address bar.
    """
    if graph.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            parts = json.loads(graph)
            graph = "-".join(str(v) for v in [parts.pop("type", ""), *parts.values()] if v)
    query = {key: values[0] for key, values in parse_qs((search or "").lstrip("?")).items()}
    parts = ["memlens", graph]
    model = query.get("model")
    if model:
        parts.append(PurePath(model).name or model)  # a checkpoint path by its folder name
    parts += [f"{prefix}{query[key]}" for key, prefix in _NAME_KEYS if query.get(key)]
    return slug("-".join(parts), max_length=100)


def _scale(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"the image scale must be a number, got {value!r}") from None


def figure_download(request: dict | None, graph: str) -> tuple[dict | None, str]:
    """``(dcc.Download payload, message)`` for a toolbar's request; the payload is None on error.

    Args:
        request: What the browser sent: ``{"figure", "format", "scale", "width", "search"}``
            (``width``: the graph's width on screen, used for images of figures without one).
        graph: The toolbar's graph key, for the file name.

    Returns:
        The payload of :func:`components.export.send_figure` and ``""``, or None and a message
        that says what went wrong and what to do.
    """
    if request is None:
        return None, ""
    if not isinstance(request, dict):
        return None, "Cannot download: the request did not arrive intact; press Download again."
    fmt = request.get("format")
    if fmt not in FORMATS:
        choices = ", ".join(name.upper() for name in FORMATS)
        return None, f"Cannot download as {fmt!r}: choose one of {choices}."
    try:
        figure = figure_from_state(request.get("figure"))
        scale = _scale(request.get("scale", DEFAULT_SCALE))
        width = as_index(request.get("width"))
        if fmt in IMAGE_FORMATS and figure.layout.width is None and width in _WIDTHS:
            # A figure that fills its card is saved as wide as it is on screen.
            figure.layout.width = width
        filename = download_filename(graph, request.get("search"))
        payload = send_figure(figure, fmt, filename=filename, scale=scale)
    except ExportUnavailableError as exc:
        logger.warning("figure export unavailable: %s", exc)
        return None, f"{fmt.upper()} is unavailable here ({exc}); HTML, CSV and NPZ still work."
    except ValueError as exc:
        logger.info("figure download refused: %s", exc)
        # Plotly's own messages span many indented lines; the toolbar has room for one.
        return None, f"Cannot download: {clip(' '.join(str(exc).split()), MAX_MESSAGE_CHARS)}"
    except Exception:  # noqa: BLE001 - a download must never take the page down
        logger.exception("figure download of %s as %s failed", graph, fmt)
        return None, "The download failed on the server; the log has the details."
    logger.info("figure download %s (%s)", payload["filename"], fmt)
    return payload, ""


# The graph's figure as the renderer holds it; getLayout is Dash's public component API.
clientside_callback(
    """
    function(n_clicks, fmt, scale, toolbar) {
        if (!n_clicks) { return window.dash_clientside.no_update; }
        const key = toolbar.graph;
        const graphId = key.startsWith('{') ? JSON.parse(key) : key;
        const api = window.dash_component_api;
        const node = api && api.getLayout ? api.getLayout(graphId) : null;
        const figure = node && node.props ? node.props.figure : null;
        const element = document.getElementById(key);
        return {
            figure: figure || null,
            format: fmt,
            scale: scale,
            width: element ? element.offsetWidth : null,
            search: window.location.search,
            clicks: n_clicks
        };
    }
    """,
    Output({"type": REQUEST_TYPE, "graph": MATCH}, "data"),
    Input({"type": BUTTON_TYPE, "graph": MATCH}, "n_clicks"),
    State({"type": FORMAT_TYPE, "graph": MATCH}, "value"),
    State({"type": SCALE_TYPE, "graph": MATCH}, "value"),
    State({"type": BUTTON_TYPE, "graph": MATCH}, "id"),
    prevent_initial_call=True,
)

clientside_callback(
    f"""
    function(fmt) {{ return !{json.dumps(list(IMAGE_FORMATS))}.includes(fmt); }}
    """,
    Output({"type": SCALE_TYPE, "graph": MATCH}, "disabled"),
    Input({"type": FORMAT_TYPE, "graph": MATCH}, "value"),
)


@callback(
    Output({"type": FILE_TYPE, "graph": MATCH}, "data"),
    Output({"type": MESSAGE_TYPE, "graph": MATCH}, "children"),
    Input({"type": REQUEST_TYPE, "graph": MATCH}, "data"),
    State({"type": REQUEST_TYPE, "graph": MATCH}, "id"),
    running=[(Output({"type": BUTTON_TYPE, "graph": MATCH}, "disabled"), True, False)],
    prevent_initial_call=True,
)
def send_figure_file(request, request_id):
    """The figure as the chosen file, or a message next to the button saying why not."""
    payload, message = figure_download(request, request_id["graph"])
    return (no_update if payload is None else payload), message


# --- Report bundle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportDownloadIds:
    """The component ids of one page's report button, prefixed by the page name."""

    page: str

    @property
    def button(self) -> str:
        return f"{self.page}-report-button"

    @property
    def file(self) -> str:
        return f"{self.page}-report-file"

    @property
    def message(self) -> str:
        return f"{self.page}-report-message"


REPORT_LABEL = "Report (ZIP)"
REPORT_TITLE = (
    "Download this analysis as one ZIP: every view as PNG, SVG, HTML, CSV and NPZ, a "
    "standalone report.html and a manifest of what made it"
)


def make_report_download(ids: ReportDownloadIds) -> html.Div:
    """A small "Report (ZIP)" button, its download and its message (inline, for a toolbar)."""
    return html.Div(
        [
            html.Small(id=ids.message, role="status", className="text-end"),
            dbc.Button(
                REPORT_LABEL,
                id=ids.button,
                color="secondary",
                outline=True,
                size="sm",
                n_clicks=0,
                title=REPORT_TITLE,
                class_name="text-nowrap",
            ),
            dcc.Download(id=ids.file),
        ],
        className="d-flex align-items-center justify-content-end gap-2",
    )


def report_message(text: str | None, *, warning: bool = False) -> html.Span | str:
    """The report button's message: red for an error, amber for a report made without images."""
    if not text:
        return ""
    return html.Span(text, className="text-warning-emphasis" if warning else "text-danger")


def report_download(collect: Callable[[], Report]) -> tuple[dict | None, html.Span | str]:
    """``(dcc.Download payload, message)`` of a report bundle; the payload is None on error.

    When PNG and SVG cannot be made here (no kaleido or Chromium) the report is built without
    them and the message says so.

    Args:
        collect: Returns the page's report (:class:`~analysis.bundle.ReportInputs` or
            :class:`~components.export.FigureReport`); raises ValueError with a message for the
            user when there is nothing to report.
    """
    try:
        inputs = collect()
        try:
            payload = send_bundle(inputs)
        except ExportUnavailableError as exc:
            logger.warning("report without images: %s", exc)
            payload = send_bundle(inputs, formats=[f for f in FORMATS if f not in IMAGE_FORMATS])
            message = f"Report made without PNG and SVG: {exc}"
            return payload, report_message(message, warning=True)
    except ValueError as exc:
        logger.info("report refused: %s", exc)
        return None, report_message(f"No report: {exc}")
    except Exception:  # noqa: BLE001 - a download must never take the page down
        logger.exception("report bundle failed")
        return None, report_message("The report failed on the server; the log has the details.")
    logger.info("report bundle %s", payload["filename"])
    return payload, ""


def register_report_download(
    ids: ReportDownloadIds, states: Sequence[State], collect: Callable[..., Report]
) -> Callable:
    """Make the page's report button build and send a bundle; call once, at import.

    The button is disabled and says "Building…" while the bundle is made (tens of seconds
    with images on a busy machine).

    Args:
        ids: The page's :class:`ReportDownloadIds`.
        states: What ``collect`` needs, as ``State``s.
        collect: ``collect(*state_values)`` returns the report (see :func:`report_download`)
            or raises ValueError with a message for the user.

    Returns:
        The registered callback function (for tests).
    """
    building = [dbc.Spinner(size="sm", spinner_class_name="me-1"), "Building…"]

    @callback(
        Output(ids.file, "data"),
        Output(ids.message, "children"),
        Input(ids.button, "n_clicks"),
        *states,
        running=[
            (Output(ids.button, "disabled"), True, False),
            (Output(ids.button, "children"), building, REPORT_LABEL),
        ],
        prevent_initial_call=True,
    )
    def send_report(n_clicks, *values):
        """The page's analysis as a report bundle, or a message saying why not."""
        if not n_clicks:
            return no_update, no_update
        payload, message = report_download(lambda: collect(*values))
        return (no_update if payload is None else payload), message

    return send_report


__all__ = [
    "BUTTON_TYPE",
    "FILE_TYPE",
    "FORMAT_TYPE",
    "MESSAGE_TYPE",
    "REQUEST_TYPE",
    "SCALE_TYPE",
    "ReportDownloadIds",
    "download_filename",
    "figure_download",
    "figure_from_state",
    "graph_key",
    "make_figure_download",
    "make_report_download",
    "register_report_download",
    "report_download",
    "report_message",
    "toolbar_id",
]
