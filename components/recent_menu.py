"""The navbar's "Recent" menu: the server's recent analyses, each a link that reopens it.

Pages call :func:`remember_view` after an analysis the user asked for; the list itself lives in
:mod:`analysis.recent` (one JSON file shared by every worker, kept across restarts). The menu is
refilled whenever the address changes (a page opened, a view chosen) and whenever a page writes
this tab's last analysis, so a fresh analysis is at its top.

The list is the server's, not the user's: everyone who uses the server sees the same entries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, get_relative_path, html

from analysis.recent import RecentAnalysis, recent, record
from components.shell import LAST_ANALYSIS_STORE

logger = logging.getLogger(__name__)

RECENT_MENU = "app-recent"
RECENT_LOCATION = "app-recent-location"
RECENT_SHOWN = 12
PROMPT_CHARS = 60


def remember_view(path: str, search: str, model: str, prompt: str, options: Mapping | None = None):
    """Put an analysis at the top of the recent list; a failure is logged, never raised.

    Args:
        path: The page's path (``/``, ``/retention``), without the app's URL prefix.
        search: The query string that reopens the view (``?model=…&prompt=…``).
        model: Model id.
        prompt: Prompt text.
        options: Analysis options worth keeping (``truncate``, ...).
    """
    try:
        record(model, prompt, options=options, url=f"{path}{search}")
    except (OSError, TimeoutError, ValueError) as exc:
        # The list is a convenience: an analysis must not fail because it could not be noted.
        logger.warning("could not record a recent analysis: %s", exc)


def page_name(url: str) -> str:
    """The registered page name of a recorded ``url`` (its path), or the path itself."""
    path = url.split("?", 1)[0] or "/"
    for page in dash.page_registry.values():
        if page.get("path") == path:
            return page["name"]
    return path


def _excerpt(prompt: str) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"


def recent_items(entries: Iterable[RecentAnalysis]) -> list[dbc.DropdownMenuItem]:
    """One menu item per entry (prompt, then page, model and UTC time), or a note when none."""
    items = [dbc.DropdownMenuItem("Recent analyses on this server", header=True)]
    for entry in entries:
        when = entry.time[:16].replace("T", " ")
        detail = f"{page_name(entry.url)} · {entry.model} · {when} UTC"
        items.append(
            dbc.DropdownMenuItem(
                [
                    html.Div(_excerpt(entry.prompt), className="text-truncate"),
                    html.Small(detail, className="text-body-secondary"),
                ],
                href=get_relative_path(entry.url or "/"),
                style={"maxWidth": "26rem"},
            )
        )
    if len(items) == 1:
        items.append(dbc.DropdownMenuItem("Nothing analysed yet", disabled=True))
    return items


def make_recent_menu() -> html.Div:
    """The "Recent" dropdown for the navbar, filled by a callback."""
    return html.Div(
        [
            dcc.Location(id=RECENT_LOCATION, refresh=False),
            dbc.Nav(
                dbc.DropdownMenu(
                    id=RECENT_MENU,
                    label="Recent",
                    children=recent_items([]),
                    nav=True,
                    in_navbar=True,
                    align_end=True,
                ),
                navbar=True,
            ),
        ],
        className="me-3",
    )


@callback(
    Output(RECENT_MENU, "children"),
    Input(RECENT_LOCATION, "href"),
    Input(LAST_ANALYSIS_STORE, "data"),
)
def refresh_recent(_href, _last):
    """The newest recent analyses, read afresh from the shared list."""
    try:
        entries = recent(RECENT_SHOWN)
    except (OSError, ValueError) as exc:
        logger.warning("could not read the recent analyses: %s", exc)
        entries = []
    return recent_items(entries)
