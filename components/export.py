"""Figures as files: PNG and SVG, offline HTML, their data as CSV and NPZ, and report bundles.

Static images are rendered on the server by kaleido 1.x in the system Chromium. kaleido takes
no browser flags, so the browser it starts is ``scripts/chromium-offline`` (named by
``BROWSER_PATH`` unless the user set that variable): Chromium with the flags that stop every
background network lookup. One browser per process is kept open between exports by
:class:`_Renderer` (about a second per image once warm, several to start). kaleido's own warm
server (``kaleido.start_sync_server``) is not used: when the browser fails to start it leaves
every later call waiting forever, and two threads calling it at once can receive each other's
image.

HTML files carry plotly.js inline and load nothing from the network. Data files hold each
trace's ``x``, ``y``, ``z`` (and ``customdata``) exactly as the figure has them, so for a long
prompt they are the block maxima the heatmap shows, not the full patterns.

Every ``send_*`` function returns what ``dcc.send_bytes`` returns, ready to be the ``data`` of a
``dcc.Download``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import csv
import html
import io
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from dash import dcc

from analysis.bundle import (
    MANIFEST_NAME,
    ReportInputs,
    app_version,
    bundle_filename,
    make_manifest,
    slug,
    utc_timestamp,
    write_atomic,
    zip_files,
)
from analysis.settings import REPO_ROOT
from components.figures import Figure, as_plotly, template_layout
from components.heatmaps import (
    downsample_attention,
    make_attention_heatmap,
    make_head_grid,
    make_model_overview,
    overview_starts,
)
from components.tokens import plotly_text, token_label

logger = logging.getLogger(__name__)

FORMATS = ("png", "svg", "html", "csv", "npz")
IMAGE_FORMATS = ("png", "svg")
MIME_TYPES = {
    "png": "image/png",
    "svg": "image/svg+xml",
    "html": "text/html",
    "csv": "text/csv",
    "npz": "application/octet-stream",
    "zip": "application/zip",
}
DEFAULT_SCALE = 2.0
MIN_SCALE, MAX_SCALE = 0.25, 8.0
# Size of an image whose figure does not set one (Dash figures usually fill their container).
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1000, 600
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_WRAPPER = REPO_ROOT / "scripts" / "chromium-offline"
INSTALL_CHROMIUM = "apt-get install -y chromium"
INSTALL_KALEIDO = "pip install kaleido==1.5.0"
# Generous on purpose: they only catch a browser that hangs. On a loaded 2-core machine Chromium
# once took four minutes of wall time (7 s of CPU) just to load plotly.js.
START_TIMEOUT_S = 300.0
RENDER_TIMEOUT_S = 180.0
_HTML_CONFIG = {"displaylogo": False, "responsive": True}


class ExportUnavailableError(ValueError):
    """Static images cannot be made here: kaleido or Chromium is missing or does not start."""


# ---------------------------------------------------------------------------------------------
# Static images through kaleido.


def browser_path() -> str:
    """The browser kaleido starts: ``BROWSER_PATH`` if set, else ``scripts/chromium-offline``.

    Sets ``BROWSER_PATH`` to the wrapper when it is unset, so anything else in the process that
    uses kaleido gets the offline browser too.

    Raises:
        ExportUnavailableError: The browser is not there, with the command that installs it.
    """
    chosen = os.environ.setdefault("BROWSER_PATH", str(CHROMIUM_WRAPPER))
    if chosen == str(CHROMIUM_WRAPPER):
        chromium = os.environ.get("CHROMIUM", CHROMIUM)
        if shutil.which(chromium) is None:
            raise ExportUnavailableError(
                f"PNG and SVG export needs Chromium, and there is none at {chromium}. Install "
                f"it with `{INSTALL_CHROMIUM}` (or point BROWSER_PATH at a Chrome or Chromium)."
            )
        if not os.access(CHROMIUM_WRAPPER, os.X_OK):
            raise ExportUnavailableError(
                f"{CHROMIUM_WRAPPER} is missing or not executable; restore it from the repository "
                f"and run `chmod +x {CHROMIUM_WRAPPER}`"
            )
    elif not os.access(chosen, os.X_OK):
        raise ExportUnavailableError(
            f"BROWSER_PATH={chosen!r} is not an executable browser; unset it to use "
            f"{CHROMIUM_WRAPPER}, or install Chromium with `{INSTALL_CHROMIUM}`"
        )
    return chosen


def _import_kaleido():
    try:
        import kaleido
    except ImportError:
        raise ExportUnavailableError(
            f"PNG and SVG export needs kaleido; install it with `{INSTALL_KALEIDO}`"
        ) from None
    return kaleido


class _Renderer:
    """One kaleido browser kept open on its own event-loop thread, shared by all threads.

    kaleido is asyncio-based; each render is submitted to the private loop and waited for with a
    timeout, so a browser that hangs or dies becomes an error here, never a stuck server thread.
    A browser that dies is started again once. After ``fork`` the child starts its own.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kaleido = None

    def start(self) -> None:
        """Start the browser now (no-op when it runs), so the first export is not the slow one."""
        with self._guard:
            if self._pid is not None and self._pid != os.getpid():
                # A forked child: the parent's loop thread does not exist here.
                self._loop = self._thread = self._kaleido = None
                self._pid = None
            if self._kaleido is None:
                self._start_locked()

    def _start_locked(self) -> None:
        kaleido = _import_kaleido()
        from choreographer.errors import ChromeNotFoundError

        path = browser_path()
        started = time.perf_counter()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="memlens-kaleido", daemon=True)
        thread.start()

        async def open_browser():
            # mathjax=False: kaleido would otherwise load MathJax from a CDN.
            browser = kaleido.Kaleido(n=1, timeout=RENDER_TIMEOUT_S, mathjax=False, path=path)
            await browser.open()
            return browser

        opening = asyncio.run_coroutine_threadsafe(open_browser(), loop)
        try:
            browser = opening.result(START_TIMEOUT_S)
        except BaseException as exc:
            # Known shortcoming: a Chromium still starting after the timeout is abandoned with
            # its loop and may live on until this process exits.
            opening.cancel()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, ChromeNotFoundError):
                raise ExportUnavailableError(
                    f"kaleido found no browser at {path}; install Chromium with "
                    f"`{INSTALL_CHROMIUM}`"
                ) from None
            if isinstance(exc, concurrent.futures.TimeoutError):
                raise ExportUnavailableError(
                    f"Chromium ({path}) did not start within {START_TIMEOUT_S:.0f} s"
                ) from None
            raise ExportUnavailableError(
                f"Chromium ({path}) did not start: {exc}. Check that `{path} --version` runs; "
                f"install Chromium with `{INSTALL_CHROMIUM}`"
            ) from exc
        self._loop, self._thread, self._kaleido, self._pid = loop, thread, browser, os.getpid()
        logger.info("kaleido browser started in %.1fs (%s)", time.perf_counter() - started, path)

    def close(self) -> None:
        """Close the browser and stop the loop thread (no-op when none runs)."""
        with self._guard:
            self._close_locked()

    def _close_locked(self) -> None:
        loop, thread, browser = self._loop, self._thread, self._kaleido
        self._loop = self._thread = self._kaleido = None
        if loop is None or self._pid != os.getpid():
            self._pid = None
            return
        self._pid = None
        try:
            asyncio.run_coroutine_threadsafe(browser.close(), loop).result(10)
        except Exception as exc:  # noqa: BLE001 - closing a dead browser may fail any way
            logger.warning("closing the kaleido browser failed: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)

    def render(self, figure: go.Figure, opts: dict) -> bytes:
        """The image bytes of ``figure`` with kaleido ``opts`` (format, width, height, scale)."""
        from kaleido.errors import KaleidoError

        for attempt in (1, 2):
            self.start()
            with self._guard:
                loop, browser = self._loop, self._kaleido
            if loop is None or browser is None:
                continue  # closed by another thread between start() and here
            future = asyncio.run_coroutine_threadsafe(browser.calc_fig(figure, opts=opts), loop)
            try:
                return future.result(RENDER_TIMEOUT_S + 5)
            except KaleidoError as exc:
                # plotly.js refused the figure: the browser is fine, the figure is not.
                raise ValueError(f"plotly.js could not render this figure: {exc}") from None
            except concurrent.futures.TimeoutError:
                future.cancel()
                self.close()
                raise ExportUnavailableError(
                    f"rendering one image took more than {RENDER_TIMEOUT_S:.0f} s; the browser "
                    "was closed and the next export starts a fresh one"
                ) from None
            except Exception as exc:  # noqa: BLE001 - the browser died: restart once
                logger.warning("kaleido render failed (%s); restarting the browser", exc)
                self.close()
                if attempt == 2:
                    raise ExportUnavailableError(f"Chromium failed while rendering: {exc}") from exc
        raise ExportUnavailableError("the kaleido browser was closed while rendering")


_renderer = _Renderer()
atexit.register(_renderer.close)


def start_renderer() -> None:
    """Start the export browser now, e.g. in a background thread when the server starts.

    Raises:
        ExportUnavailableError: kaleido or Chromium is missing, or Chromium does not start.
    """
    _renderer.start()


def stop_renderer() -> None:
    """Close the export browser (it starts again on the next export)."""
    _renderer.close()


def check_scale(scale: float) -> float:
    """``scale`` as a float; ValueError unless it is a number from MIN_SCALE to MAX_SCALE."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the image scale must be a number, got {scale!r}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(
            f"the image scale must be from {MIN_SCALE:g} to {MAX_SCALE:g}, got {scale:g}"
        )
    return float(scale)


def image_size(figure: Figure | go.Figure) -> tuple[int, int]:
    """``(width, height)`` in CSS pixels that an image of ``figure`` gets at scale 1."""
    figure = as_plotly(figure)
    width = figure.layout.width or DEFAULT_WIDTH
    height = figure.layout.height or DEFAULT_HEIGHT
    return int(width), int(height)


def figure_image(
    figure: Figure | go.Figure,
    fmt: str = "png",
    *,
    scale: float = DEFAULT_SCALE,
    width: int | None = None,
    height: int | None = None,
) -> bytes:
    """Render ``figure`` to PNG or SVG in the export browser.

    Args:
        figure: The figure.
        fmt: ``"png"`` or ``"svg"``.
        scale: Pixel density: a PNG is ``width * scale`` by ``height * scale`` pixels.
        width: Width in CSS pixels; the figure's own, else :data:`DEFAULT_WIDTH`.
        height: Height in CSS pixels; the figure's own, else :data:`DEFAULT_HEIGHT`.

    Returns:
        The file's bytes.

    Raises:
        ValueError: Unknown format, or a scale outside :data:`MIN_SCALE` .. :data:`MAX_SCALE`.
        ExportUnavailableError: kaleido or Chromium is missing or failed.
    """
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"images are {' or '.join(IMAGE_FORMATS)}, not {fmt!r}")
    scale = check_scale(scale)
    figure = as_plotly(figure)
    own_width, own_height = image_size(figure)
    opts = {
        "format": fmt,
        "width": int(width or own_width),
        "height": int(height or own_height),
        "scale": scale,
    }
    started = time.perf_counter()
    content = _renderer.render(figure, opts)
    logger.info(
        "rendered %s %dx%d@%g in %.2fs",
        fmt,
        opts["width"],
        opts["height"],
        scale,
        time.perf_counter() - started,
    )
    return content


# ---------------------------------------------------------------------------------------------
# HTML and data.


def figure_html(figure: Figure | go.Figure, *, title: str = "MemLens figure") -> bytes:
    """One HTML page of ``figure``, interactive and offline: plotly.js is inlined (~4.7 MB)."""
    page = pio.to_html(
        as_plotly(figure),
        include_plotlyjs=True,
        full_html=True,
        config=_HTML_CONFIG,
        validate=False,
    )
    # plotly's page has no <title>; browsers and file managers show it.
    page = page.replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    return page.encode("utf-8")


_TRACE_FIELDS = ("x", "y", "z", "customdata")


def _trace_stems(figure: go.Figure) -> list[str]:
    stems: list[str] = []
    for index, trace in enumerate(figure.data):
        stem = slug(trace.name, max_length=30) if trace.name else f"trace{index}"
        while stem in stems:
            stem = f"{stem}_{index}"
        stems.append(stem)
    return stems


def figure_arrays(figure: Figure | go.Figure) -> dict[str, np.ndarray]:
    """Each trace's ``x``, ``y``, ``z`` and ``customdata`` as arrays named ``<trace>_<field>``.

    A trace is named by its ``name`` (made file-name-safe) or else ``trace<i>``. Labels come back
    as unicode string arrays, values as numbers (NaN where the figure has gaps), so the NPZ
    loads with ``allow_pickle=False``.

    Returns:
        ``{"<trace>_<field>": array}`` in trace order; fields a trace lacks are left out.
    """
    figure = as_plotly(figure)
    arrays: dict[str, np.ndarray] = {}
    for stem, trace in zip(_trace_stems(figure), figure.data, strict=True):
        for name in _TRACE_FIELDS:
            value = getattr(trace, name, None)
            if value is None:
                continue
            array = np.asarray(value)
            if array.dtype == object:
                array = np.asarray([str(v) for v in array.ravel()]).reshape(array.shape)
            arrays[f"{stem}_{name}"] = array
    return arrays


def figure_npz(figure: Figure | go.Figure) -> bytes:
    """:func:`figure_arrays` as a compressed ``.npz`` file."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **figure_arrays(figure))
    return buffer.getvalue()


def _csv_cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        # str() of a numpy float is its shortest round-tripping form in its own precision.
        return "" if math.isnan(value) else str(value)
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def figure_csv(figure: Figure | go.Figure) -> bytes:
    """The figure's data as one long CSV table: ``trace,x,y,z`` (UTF-8).

    A heatmap gives one row per cell (``x`` and ``y`` are its labels, or column and row indices
    when the figure has none; an empty ``z`` is a gap). Other traces give one row per point
    with an empty ``z``.
    """
    figure = as_plotly(figure)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trace", "x", "y", "z"])
    for stem, trace in zip(_trace_stems(figure), figure.data, strict=True):
        z = getattr(trace, "z", None)
        if z is not None and np.ndim(z) == 2:
            z = np.asarray(z)
            n_rows, n_cols = z.shape
            xs = trace.x if trace.x is not None else range(n_cols)
            ys = trace.y if trace.y is not None else range(n_rows)
            for row, y in zip(range(n_rows), ys, strict=False):
                for col, x in zip(range(n_cols), xs, strict=False):
                    writer.writerow([stem, _csv_cell(x), _csv_cell(y), _csv_cell(z[row, col])])
        else:
            ys = trace.y if getattr(trace, "y", None) is not None else []
            xs = trace.x if getattr(trace, "x", None) is not None else range(len(ys))
            for x, y in zip(xs, ys, strict=False):
                writer.writerow([stem, _csv_cell(x), _csv_cell(y), ""])
    return buffer.getvalue().encode("utf-8")


def figure_bytes(
    figure: Figure | go.Figure,
    fmt: str,
    *,
    scale: float = DEFAULT_SCALE,
    title: str = "MemLens figure",
) -> bytes:
    """``figure`` as a file of format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt in IMAGE_FORMATS:
        return figure_image(figure, fmt, scale=scale)
    if fmt == "html":
        return figure_html(figure, title=title)
    if fmt == "csv":
        return figure_csv(figure)
    if fmt == "npz":
        return figure_npz(figure)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def send_figure(
    figure: Figure | go.Figure,
    fmt: str,
    *,
    filename: str = "memlens-figure",
    scale: float = DEFAULT_SCALE,
) -> dict:
    """``figure`` as a ``dcc.Download`` payload (what ``dcc.send_bytes`` returns).

    Args:
        figure: The figure.
        fmt: One of :data:`FORMATS`.
        filename: File name without extension (made file-name-safe here).
        scale: Image scale, for PNG and SVG.

    Returns:
        ``{"content": <base64>, "filename": "<name>.<fmt>", "type": <mime>, "base64": True}``.

    Raises:
        ValueError: Unknown format or bad scale.
        ExportUnavailableError: PNG or SVG asked for where kaleido or Chromium is missing.
    """
    content = figure_bytes(figure, fmt, scale=scale, title=filename)
    return dcc.send_bytes(content, f"{slug(filename, max_length=80)}.{fmt}", MIME_TYPES[fmt])


# ---------------------------------------------------------------------------------------------
# Figures only the bundle needs.


def _template_layout(dark: bool) -> dict:
    return {"template": template_layout(dark)}


def _position_labels(str_tokens: Sequence[str], positions: Iterable[int]) -> list[str]:
    return [token_label(pos, str_tokens[pos]) for pos in positions]


def _category_axis(labels: list[str], max_ticks: int = 48) -> dict:
    every = max(1, math.ceil(len(labels) / max_ticks))
    return {
        "type": "category",
        "tickmode": "array",
        "tickvals": labels[::every],
        "tickfont": {"size": 10},
        "tickangle": -90,
        "showgrid": False,
        "automargin": True,
    }


def make_loss_figure(loss: np.ndarray, str_tokens: Sequence[str], *, dark: bool = False):
    """Per-token loss as bars, one per predicted token.

    Args:
        loss: ``[pos - 1]`` nats; entry ``i`` is the loss of predicting token ``i + 1``.
        str_tokens: ``[pos]`` the tokens as text.
        dark: Use the dark template.
    """
    loss = np.asarray(loss, dtype=np.float32)
    if loss.shape != (len(str_tokens) - 1,):
        raise ValueError(
            f"loss {loss.shape} and {len(str_tokens)} tokens do not match: expected [pos - 1]"
        )
    labels = _position_labels(str_tokens, range(1, len(str_tokens)))
    bars = go.Bar(
        x=labels,
        y=loss,
        name="loss",
        hovertemplate="predicting %{x}<br>loss %{y:.3f} nats<extra></extra>",
    )
    layout = {
        **_template_layout(dark),
        "title": {"text": "Loss per token", "x": 0, "xanchor": "left", "font": {"size": 14}},
        "height": 420,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {**_category_axis(labels), "title": {"text": "predicted token"}},
        "yaxis": {"title": {"text": "loss (nats)"}, "rangemode": "tozero"},
    }
    return go.Figure([bars], layout=layout)


def stage_labels(n_layers: int) -> list[str]:
    """Row labels of per-stage arrays: ``embed``, then ``after L0`` .. ``after L{n-1}``."""
    return ["embed", *(f"after L{layer}" for layer in range(n_layers))]


def make_stage_heatmap(
    values: np.ndarray,
    str_tokens: Sequence[str],
    *,
    title: str,
    colorbar: str,
    log_rank: bool = False,
    dark: bool = False,
):
    """A stages x positions heatmap (residual norms, logit-lens ranks, ...).

    Args:
        values: ``[n_layers + 1, pos]``; row ``l`` is ``resid_pre`` of block ``l`` and the last
            row the final ``resid_post``.
        str_tokens: ``[pos]`` the tokens as text.
        title: Figure title.
        colorbar: Colour-bar title.
        log_rank: ``values`` are ranks (0 = top): colour by ``log10(1 + rank)``, best ranks
            brightest, with the ranks themselves in hover and ``customdata``.
        dark: Use the dark template.
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != len(str_tokens):
        raise ValueError(
            f"values {values.shape} and {len(str_tokens)} tokens do not match: expected "
            "[n_layers + 1, pos]"
        )
    x = _position_labels(str_tokens, range(len(str_tokens)))
    y = stage_labels(values.shape[0] - 1)
    trace = {"type": "heatmap", "x": x, "y": y, "hoverongaps": False, "name": slug(colorbar)}
    if log_rank:
        ranks = values.astype(np.int64)
        top = max(int(ranks.max()), 1)
        ticks = [r for r in (0, 1, 10, 100, 1_000, 10_000, 100_000) if r <= top]
        trace.update(
            z=np.log10(1.0 + ranks).astype(np.float32),
            customdata=ranks,
            colorscale="Viridis",
            reversescale=True,
            zmin=0.0,
            colorbar={
                "title": {"text": colorbar},
                "tickvals": [math.log10(1 + r) for r in ticks],
                "ticktext": [str(r) for r in ticks],
            },
            hovertemplate="%{y} · %{x}<br>rank %{customdata}<extra></extra>",
        )
    else:
        trace.update(
            z=values.astype(np.float32),
            colorscale="Viridis",
            colorbar={"title": {"text": colorbar}},
            hovertemplate="%{y} · %{x}<br>%{z:.3f}<extra></extra>",
        )
    layout = {
        **_template_layout(dark),
        "title": {"text": plotly_text(title), "x": 0, "xanchor": "left", "font": {"size": 14}},
        "height": 140 + 28 * values.shape[0],
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {**_category_axis(x), "title": {"text": "position"}},
        "yaxis": {"type": "category", "autorange": "reversed", "title": {"text": "stage"}},
    }
    return go.Figure([trace], layout=layout)


# ---------------------------------------------------------------------------------------------
# Report bundles.


@dataclass(frozen=True)
class ReportFigure:
    """One figure of a report: file stem, heading and the figure (a builder's dict becomes a
    ``go.Figure``, as the export formats want)."""

    name: str
    title: str
    figure: go.Figure

    def __post_init__(self) -> None:
        object.__setattr__(self, "figure", as_plotly(self.figure))


@dataclass(frozen=True)
class FigureReport:
    """A report of figures a page has built itself, with what made them.

    For pages whose views are not one prompt's attention and retention (Compare, Ablate): their
    bundle holds exactly these figures. :class:`~analysis.bundle.ReportInputs` is the other kind
    of report, whose figures :func:`report_figures` builds.

    Attributes:
        model_id: The model's id.
        fingerprint: Short hash of its weights.
        prompts: The prompt(s) the figures show.
        figures: The figures, in report order; each ``name`` is unique.
        options: The page's choices that made them (layer, head, method, ...), for the manifest.
        facts: ``(label, value)`` rows for the head of ``report.html``.
        prompt_labels: A heading per prompt in ``report.html`` (``"Prompt"``, ``"Prompt 2"``, ...
            when empty).
    """

    model_id: str
    fingerprint: str
    prompts: tuple[str, ...]
    figures: tuple[ReportFigure, ...]
    options: dict = field(default_factory=dict)
    facts: tuple[tuple[str, str], ...] = ()
    prompt_labels: tuple[str, ...] = ()

    def settings(self) -> dict:
        """The choices that made this report, for the manifest."""
        return dict(self.options)


Report = ReportInputs | FigureReport


def _prompt_headings(report: Report) -> list[str]:
    labels = list(getattr(report, "prompt_labels", ()))
    if len(labels) == len(report.prompts):
        return labels
    if len(report.prompts) == 1:
        return ["Prompt"]
    return [f"Prompt {index}" for index in range(1, len(report.prompts) + 1)]


def report_figures(inputs: ReportInputs, *, dark: bool = False) -> list[ReportFigure]:
    """The figures of a report bundle, in report order.

    The model overview (every head of every layer), then for each chosen layer either one grid
    of all its heads or each chosen head on its own, then the per-token loss, then the
    residual-norm and logit-lens rank heatmaps when ``inputs`` has them.

    Args:
        inputs: From :func:`analysis.bundle.collect_report`.
        dark: Use the dark templates.
    """
    figures = []
    tokens = inputs.str_tokens
    n_pos = len(tokens)

    # The overview reads every layer once, downsampled as it goes.
    starts = overview_starts(n_pos, inputs.n_layers * inputs.n_heads)
    thumbnails = np.stack(
        [downsample_attention(inputs.attention(layer), starts) for layer in range(inputs.n_layers)]
    )
    figures.append(
        ReportFigure(
            "overview",
            "Every head of every layer (layers down, heads across)",
            make_model_overview(thumbnails, starts, dark=dark),
        )
    )

    for layer in inputs.layers:
        patterns = inputs.attention(layer)
        if inputs.heads is None:
            grid = make_head_grid(patterns, layer=layer, dark=dark)
            for head, trace in enumerate(grid["data"]):
                trace["name"] = f"L{layer}H{head}"
            figures.append(ReportFigure(f"attention-L{layer}", f"Layer {layer}: every head", grid))
            continue
        for head in inputs.heads:
            title = f"Layer {layer} · head {head}"
            heatmap = make_attention_heatmap(patterns[head], tokens, title=title, dark=dark)
            figures.append(ReportFigure(f"attention-L{layer}-H{head}", title, heatmap))

    if n_pos > 1:
        figures.append(
            ReportFigure("loss", "Loss per token", make_loss_figure(inputs.loss, tokens, dark=dark))
        )
    if inputs.resid_norms is not None:
        title = "Residual-stream norm per stage and position"
        norms = make_stage_heatmap(
            inputs.resid_norms, tokens, title=title, colorbar="L2 norm", dark=dark
        )
        figures.append(ReportFigure("resid-norm", title, norms))
    if inputs.lens_rank is not None:
        title = "Logit-lens rank of each position's own token (0 = top prediction)"
        ranks = make_stage_heatmap(
            inputs.lens_rank, tokens, title=title, colorbar="rank", log_rank=True, dark=dark
        )
        figures.append(ReportFigure("lens-rank", title, ranks))
    return figures


def report_html(
    figures: Sequence[ReportFigure], inputs: Report, *, created: str, version: str
) -> bytes:
    """One standalone, offline HTML page of every figure; plotly.js is included once."""
    from plotly.offline import get_plotlyjs

    facts = inputs.facts() if isinstance(inputs, ReportInputs) else list(inputs.facts)
    rows = [
        ("Model", inputs.model_id),
        ("Weights fingerprint", inputs.fingerprint),
        *facts,
        ("Created (UTC)", created),
        ("MemLens", version),
    ]
    table = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows
    )
    prompts = "".join(
        f"<h2>{html.escape(heading)}</h2>\n<pre>{html.escape(prompt)}</pre>\n"
        for heading, prompt in zip(_prompt_headings(inputs), inputs.prompts, strict=True)
    )
    sections = []
    for index, item in enumerate(figures):
        div = pio.to_html(
            item.figure,
            include_plotlyjs=False,
            full_html=False,
            div_id=f"figure-{index}",
            config=_HTML_CONFIG,
            validate=False,
        )
        sections.append(
            f'<section id="{html.escape(item.name)}"><h2>{html.escape(item.title)}</h2>'
            f"{div}</section>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>MemLens report · {html.escape(inputs.model_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #212529; }}
th {{ text-align: left; padding-right: 1rem; font-weight: 600; }}
pre {{ white-space: pre-wrap; background: #f8f9fa; padding: 0.75rem; border-radius: 4px; }}
section {{ margin-top: 2rem; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<h1>MemLens report</h1>
<table>{table}</table>
{prompts}{"".join(sections)}
</body>
</html>
"""
    return page.encode("utf-8")


def check_formats(formats: Iterable[str] | str) -> tuple[str, ...]:
    """Export formats without repeats, from names or a comma-separated string.

    Raises:
        ValueError: An unknown format, or none at all.
    """
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ValueError(
            f"unknown export format(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FORMATS)}"
        )
    return chosen


def build_bundle(
    inputs: Report,
    *,
    formats: Iterable[str] = FORMATS,
    scale: float = DEFAULT_SCALE,
    dark: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    created: datetime | None = None,
) -> tuple[bytes, dict]:
    """A report bundle: every figure in every format, ``report.html`` and ``manifest.json``.

    Archive layout: ``png/``, ``svg/``, ``html/`` (each page loads ``html/plotly.min.js``, stored
    once, so the bundle stays small; ``report.html`` is the one self-contained page) and
    ``data/`` (``.csv`` and ``.npz``), each file named after its figure.

    Args:
        inputs: From :func:`analysis.bundle.collect_report`, or a page's :class:`FigureReport`.
        formats: Per-figure formats, a subset of :data:`FORMATS`.
        scale: Scale of PNG and SVG images.
        dark: Use the dark templates (a :class:`FigureReport` keeps its figures' own).
        progress: Called as ``progress(done, total, file_name)`` after each file.
        created: Time recorded in the manifest and report (now if None).

    Returns:
        ``(zip bytes, manifest)``.

    Raises:
        ValueError: Unknown format or bad scale.
        ExportUnavailableError: PNG or SVG asked for where kaleido or Chromium is missing.
    """
    formats = check_formats(formats)
    if any(fmt in IMAGE_FORMATS for fmt in formats):
        check_scale(scale)
        start_renderer()  # fail before any work when images cannot be made
    if isinstance(inputs, FigureReport):
        figures = list(inputs.figures)
        if not figures:
            raise ValueError("there is no figure to report yet")
        names = [item.name for item in figures]
        if len(set(names)) < len(names):
            raise ValueError(f"report figures need distinct names, got {names}")
    else:
        figures = report_figures(inputs, dark=dark)
    folders = {"png": "png", "svg": "svg", "html": "html", "csv": "data", "npz": "data"}
    total = len(figures) * len(formats) + 1
    files: dict[str, bytes] = {}
    steps = 0

    def done(name: str) -> None:
        nonlocal steps
        steps += 1
        if progress is not None:
            progress(steps, total, name)

    for item in figures:
        for fmt in formats:
            name = f"{folders[fmt]}/{item.name}.{fmt}"
            if fmt == "html":
                page = pio.to_html(
                    item.figure,
                    include_plotlyjs="directory",
                    full_html=True,
                    config=_HTML_CONFIG,
                    validate=False,
                )
                files[name] = page.encode("utf-8")
            else:
                files[name] = figure_bytes(item.figure, fmt, scale=scale)
            done(name)
    if "html" in formats:
        from plotly.offline import get_plotlyjs

        files["html/plotly.min.js"] = get_plotlyjs().encode("utf-8")

    settings = {**inputs.settings(), "formats": list(formats), "scale": scale, "dark": dark}
    created = datetime.now(UTC) if created is None else created
    files["report.html"] = report_html(
        figures, inputs, created=utc_timestamp(created), version=app_version()
    )
    manifest = make_manifest(
        files,
        model_id=inputs.model_id,
        fingerprint=inputs.fingerprint,
        prompts=list(inputs.prompts),
        settings=settings,
        created=created,
    )
    done("report.html")
    return zip_files(files, manifest), manifest


def write_bundle(inputs: Report, out_dir: Path | str, **options) -> Path:
    """Build a report bundle and write it atomically into ``out_dir`` (created if needed).

    Args:
        inputs: From :func:`analysis.bundle.collect_report`.
        out_dir: Directory of the ZIP file.
        **options: ``formats``, ``scale``, ``dark``, ``progress`` of :func:`build_bundle`.

    Returns:
        The path of the ZIP, ``memlens-<model>-<prompt hash>-<UTC time>.zip``.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; give a directory to write the bundle into")
    out_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    content, _ = build_bundle(inputs, created=created, **options)
    name = bundle_filename(inputs.model_id, inputs.prompts, created)
    path = write_atomic(out_dir / name, content)
    logger.info("wrote report bundle %s (%.1f MB)", path, len(content) / 1e6)
    return path


def send_bundle(inputs: Report, **options) -> dict:
    """A report bundle as a ``dcc.Download`` payload; ``options`` as for :func:`build_bundle`."""
    created = datetime.now(UTC)
    content, _ = build_bundle(inputs, created=created, **options)
    name = bundle_filename(inputs.model_id, inputs.prompts, created)
    return dcc.send_bytes(content, name, MIME_TYPES["zip"])


__all__ = [
    "DEFAULT_SCALE",
    "FORMATS",
    "IMAGE_FORMATS",
    "MANIFEST_NAME",
    "MAX_SCALE",
    "MIN_SCALE",
    "ExportUnavailableError",
    "FigureReport",
    "Report",
    "ReportFigure",
    "build_bundle",
    "check_formats",
    "check_scale",
    "figure_arrays",
    "figure_bytes",
    "figure_csv",
    "figure_html",
    "figure_image",
    "figure_npz",
    "make_loss_figure",
    "make_stage_heatmap",
    "report_figures",
    "report_html",
    "send_bundle",
    "send_figure",
    "start_renderer",
    "stop_renderer",
    "write_bundle",
]
