"""Tokens reach the page as visible text, never as markup."""

from __future__ import annotations

import pytest

from components.alerts import alert_update, make_error_alert
from components.prompt_panel import EXAMPLE_PROMPTS, PromptPanelIds, example_prompt
from components.tokens import (
    SELECTED_TOKEN_CLASS,
    TOKEN_CLASS,
    display_token,
    make_token_strip,
    plotly_text,
)


@pytest.mark.parametrize(
    ("token", "shown"),
    [(" the", "·the"), ("\n", "↵"), ("\t", "⇥"), ("a\r\n", "a␍↵"), ("", "∅"), ("x", "x")],
)
def test_whitespace_is_made_visible(token, shown):
    assert display_token(token) == shown


def test_token_strip_holds_tokens_as_plain_strings_with_the_selection_marked():
    strip = make_token_strip(["<script>alert(1)</script>", " b"], token_type="t", selected=1)

    first, second = strip.children
    assert first.children == "<script>alert(1)</script>"  # a string child: React escapes it
    assert isinstance(first.children, str)
    assert first.id == {"type": "t", "index": 0}
    assert (first.className, second.className) == (TOKEN_CLASS, SELECTED_TOKEN_CLASS)


def test_plotly_text_escapes_the_tags_plotly_would_render():
    escaped = '&lt;a href="javascript:x"&gt;&amp;&lt;/a&gt;'

    assert plotly_text('<a href="javascript:x">&</a>') == escaped


def test_alert_is_open_only_with_a_message():
    assert alert_update(None) == ("", False)
    assert alert_update("bad") == ("bad", True)
    assert make_error_alert("a").is_open is False
    assert make_error_alert("a", "oops").children == "oops"


def test_examples_include_a_repeated_phrase_for_induction_heads():
    text = example_prompt(0)
    half = len(text) // 2

    assert text[:half].strip() == text[half:].strip()
    with pytest.raises(ValueError, match="no example 9"):
        example_prompt(9)
    with pytest.raises(ValueError, match="integer"):
        example_prompt("0")
    assert len(EXAMPLE_PROMPTS) >= 3


def test_panel_ids_are_prefixed_by_page():
    ids = PromptPanelIds("retention")

    assert (ids.prompt, ids.model, ids.analyse) == (
        "retention-prompt",
        "retention-model",
        "retention-analyse",
    )
