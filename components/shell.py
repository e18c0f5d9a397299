"""The app shell: navbar, light/dark switch, app-wide stores and the figure templates.

Colour mode follows Bootstrap 5.3's ``data-bs-theme`` attribute, set on ``<html>`` by a clientside
callback, so the page restyles without a server round trip. Plotly figures cannot read CSS, so
figure callbacks take the switch's value as an input and pick the matching
dash-bootstrap-templates template with :func:`figure_template`.
"""

from __future__ import annotations

import dash_bootstrap_components as dbc
import plotly.graph_objects as go
import plotly.io as pio
from dash import Input, Output, clientside_callback, dcc, html
from dash_bootstrap_templates import load_figure_template

# App-wide component ids, declared once.
COLOR_MODE_SWITCH = "app-color-mode"
LAST_ANALYSIS_STORE = "app-last-analysis"
NAVBAR = "app-navbar"

LIGHT_TEMPLATE = "bootstrap"
DARK_TEMPLATE = "bootstrap_dark"


# The trace types MemLens draws. The templates style two dozen others; every figure carries its
# template, and plotly copies it three times on the way to JSON, so the rest is dropped.
TRACE_TYPES = ("bar", "heatmap", "scatter")


def load_figure_templates() -> None:
    """Register the light and dark Bootstrap figure templates with plotly.io (light default),
    styling only :data:`TRACE_TYPES`."""
    load_figure_template([LIGHT_TEMPLATE, DARK_TEMPLATE])
    for name in (LIGHT_TEMPLATE, DARK_TEMPLATE):
        template = pio.templates[name]
        data = template.data.to_plotly_json()
        pio.templates[name] = go.layout.Template(
            layout=template.layout, data={kind: data[kind] for kind in TRACE_TYPES if kind in data}
        )


def figure_template(dark: bool | None) -> str:
    """Figure template name for the colour mode (``None``, before the switch loads, is light).

    Registers the templates on first use, so figure builders work outside the app too.
    """
    name = DARK_TEMPLATE if dark else LIGHT_TEMPLATE
    if name not in pio.templates:
        load_figure_templates()
    return name


def make_color_mode_switch() -> html.Div:
    """A "Dark" switch, remembered in the browser's local storage."""
    return html.Div(
        dbc.Switch(
            id=COLOR_MODE_SWITCH,
            label="Dark",
            value=False,
            persistence=True,
            persistence_type="local",
            class_name="mb-0",
            label_class_name="text-body-secondary",
        ),
        className="d-flex align-items-center",
    )


def make_navbar(pages: list[dict], *, brand: str = "MemLens") -> dbc.Navbar:
    """A navbar: one link per registered page (in ``order``), the recent analyses, dark mode.

    Args:
        pages: ``dash.page_registry.values()``: dicts with ``name``, ``relative_path`` and
            ``order``.
        brand: Text of the brand link to ``/``.
    """
    # Imported here: the menu reads this module's store id.
    from components.recent_menu import make_recent_menu

    links = [
        dbc.NavLink(page["name"], href=page["relative_path"], active="exact")
        for page in sorted(pages, key=lambda page: (page.get("order") is None, page.get("order")))
    ]
    return dbc.Navbar(
        dbc.Container(
            [
                dbc.NavbarBrand(brand, href="/", class_name="fw-semibold"),
                dbc.Nav(links, navbar=True, class_name="me-auto"),
                make_recent_menu(),
                make_color_mode_switch(),
            ],
            fluid=True,
        ),
        id=NAVBAR,
        # Bootstrap 5.3 navbars adapt to data-bs-theme when neither navbar-dark nor a colour
        # class is set; "transparent" keeps dbc from adding bg-primary.
        color="transparent",
        dark=False,
        class_name="bg-body-tertiary border-bottom mb-3",
    )


def make_app_stores() -> list[dcc.Store]:
    """Stores every page may read: the last analysed model and prompt of this browser tab.

    ``LAST_ANALYSIS_STORE`` holds ``{"model", "prompt", "truncate"}``. Several pages write it,
    so every writer uses ``Output(LAST_ANALYSIS_STORE, "data", allow_duplicate=True)`` (with
    ``prevent_initial_call=True``), best in a small callback whose inputs are all the page's own.
    Two writers without ``allow_duplicate`` clash in the browser: one displaces the other and the
    renderer reports a "nonexistent object" error on every page.
    """
    return [dcc.Store(id=LAST_ANALYSIS_STORE, storage_type="session")]


clientside_callback(
    """
    function(dark) {
        document.documentElement.setAttribute('data-bs-theme', dark ? 'dark' : 'light');
        return window.dash_clientside.no_update;
    }
    """,
    Output(COLOR_MODE_SWITCH, "id"),
    Input(COLOR_MODE_SWITCH, "value"),
)


def make_card(title: str, body, *, extra=None, class_name: str = "") -> dbc.Card:
    """A titled card; ``extra`` (pickers, hints) sits at the right of the header."""
    header = html.Div(
        [html.Span(title, className="fw-semibold"), extra],
        className="d-flex flex-wrap align-items-center justify-content-between gap-2",
    )
    return dbc.Card(
        [dbc.CardHeader(header), dbc.CardBody(body)], class_name=f"mb-3 {class_name}".strip()
    )
