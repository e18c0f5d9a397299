"""The error alert every page shows above its content."""

from __future__ import annotations

import dash_bootstrap_components as dbc


def make_error_alert(alert_id: str, message: str | None = None) -> dbc.Alert:
    """A dismissable danger alert, open only when there is a message.

    Callbacks update it through :func:`alert_update`: ``Output(alert_id, "children")`` and
    ``Output(alert_id, "is_open")``.
    """
    return dbc.Alert(
        message or "",
        id=alert_id,
        color="danger",
        dismissable=True,
        is_open=bool(message),
        class_name="mb-3",
    )


def alert_update(message: str | None) -> tuple[str, bool]:
    """``(children, is_open)`` for the alert: shown with ``message``, hidden when it is None."""
    return (message or "", bool(message))
