"""The error alert every page shows above its content, and the app-wide one for the unexpected.

Pages catch the ``ValueError`` their own input can cause and show it in their alert. Anything a
callback still raises (a request a browser would never send, a bug) reaches
:func:`show_callback_error`, the app's ``on_error`` handler: it logs the error and shows one
line in :data:`APP_ALERT`, above every page, instead of letting the request fail with a 500.
"""

from __future__ import annotations

import logging

import dash_bootstrap_components as dbc
from dash import callback_context, set_props
from dash.exceptions import BackgroundCallbackError

from components.url_state import clip

logger = logging.getLogger(__name__)

APP_ALERT = "app-alert"
# A message quoted from an exception is cut here, so a pasted essay in it stays readable.
MAX_MESSAGE_CHARS = 400


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


def _callback_name() -> str:
    """The outputs of the failing callback, for the log."""
    try:
        outputs = callback_context.outputs_list
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"
    outputs = outputs if isinstance(outputs, list) else [outputs]
    names = [f"{o.get('id')}.{o.get('property')}" for o in outputs if isinstance(o, dict)]
    return ", ".join(names)[:200]


def callback_error_message(error: Exception) -> str:
    """What the app-wide alert says about ``error``: its message for a ValueError (written for
    users), the kind of error otherwise; never a traceback."""
    if isinstance(error, ValueError):
        text = str(error).strip() or type(error).__name__
    elif isinstance(error, BackgroundCallbackError):
        # Dash appends the job's traceback after the first line; the log has it, the page not.
        first = str(error).split("\n", 1)[0].removeprefix("An error occurred inside a ")
        text = f"A long job failed: {first.removeprefix('background callback: ')}"
    else:
        text = (
            f"MemLens could not answer this request ({type(error).__name__}); reload the page. "
            "The server log has the details."
        )
    return clip(text, MAX_MESSAGE_CHARS)


def show_callback_error(error: Exception) -> None:
    """The app's ``on_error`` handler: log ``error`` and show it in :data:`APP_ALERT`.

    Returning None leaves every output of the failing callback as it was; the request answers
    200 with the alert as a side update.
    """
    if isinstance(error, ValueError):
        logger.warning("callback %s refused: %s", _callback_name(), error)
    else:
        logger.error("callback %s failed", _callback_name(), exc_info=error)
    set_props(APP_ALERT, {"children": callback_error_message(error), "is_open": True})
