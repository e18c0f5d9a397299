"""Tokens as the user sees them: visible whitespace, always rendered as text.

User text reaches the page only as Dash string children (React escapes them) and reaches Plotly
only through :func:`plotly_text` (Plotly reads ``<br>``, ``<b>``, ``<a href>`` and entities in its
labels, so they are escaped).
"""

from __future__ import annotations

import html as html_lib

from dash import html

# Whitespace and invisible characters shown as visible marks.
_VISIBLE = str.maketrans(
    {
        " ": "·",
        "\n": "↵",
        "\t": "⇥",
        "\r": "␍",
        "\u00a0": "⍽",
        "\u200b": "∅",
    }
)
EMPTY_TOKEN = "∅"


def display_token(text: str) -> str:
    """``text`` with whitespace made visible: space ·, newline ↵, tab ⇥, carriage return ␍."""
    shown = text.translate(_VISIBLE)
    return shown if shown else EMPTY_TOKEN


def plotly_text(text: str) -> str:
    """``text`` escaped for Plotly labels and hover text, which otherwise parse HTML tags."""
    return html_lib.escape(text, quote=False)


def token_label(position: int, text: str) -> str:
    """A unique, Plotly-safe axis label for a token: ``12 ·cat``."""
    return f"{position} {plotly_text(display_token(text))}"


def token_button_id(token_type: str, position: int) -> dict:
    """Pattern-matching id of one token in a strip whose buttons share ``token_type``."""
    return {"type": token_type, "index": position}


TOKEN_CLASS = "ml-token"
SELECTED_TOKEN_CLASS = "ml-token ml-token-selected"


def token_class(position: int, selected: int | None) -> str:
    """CSS classes of a token chip; the selected one is highlighted."""
    return SELECTED_TOKEN_CLASS if position == selected else TOKEN_CLASS


def make_token_strip(
    str_tokens: list[str], *, token_type: str, selected: int | None = None
) -> html.Div:
    """Every token as a clickable chip, whitespace visible, in prompt order.

    Args:
        str_tokens: The tokens as text, ``[pos]``.
        token_type: The ``type`` of the chips' pattern-matching ids
            (``{"type": token_type, "index": pos}``), e.g. ``"attention-token"``; a callback
            with ``Input({"type": token_type, "index": ALL}, "n_clicks")`` hears the clicks.
        selected: Position to highlight, if any.

    Returns:
        A ``div`` of ``button`` chips with the position in each chip's tooltip.
    """
    return html.Div(
        [
            html.Button(
                display_token(text),
                id=token_button_id(token_type, position),
                className=token_class(position, selected),
                title=f"position {position}",
                n_clicks=0,
            )
            for position, text in enumerate(str_tokens)
        ],
        className="ml-token-strip",
    )
