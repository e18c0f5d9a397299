"""Random prompts and links through the real app: a message or a page, never a failure.

Bounded: few examples, a fixed seed (``derandomize``) and no example database, so a run takes
seconds and every run tries the same inputs. The layout's query parser has its own, larger fuzz
run in tests/app/test_attention_callbacks.py.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.models import DEMO_MODEL
from analysis.prompt import validate_prompt
from tests.hardening.dash_http import initial_values
from tests.hardening.test_bad_inputs import render_page

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None)
MAX_CHARS = 60

# Text with what breaks naive code: controls, surrogates, joiners, bidi marks, emoji.
awkward_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),
        st.sampled_from("\x00\x1b\x7f\x85\ud800\udfff\u200b\u200d\u202e\ufeff🦀👩‍👧<>&\"'"),
    ),
    max_size=MAX_CHARS,
)


@FUZZ
@given(awkward_text)
def test_validate_prompt_accepts_exactly_the_text_a_model_can_take(prompt):
    try:
        accepted = validate_prompt(prompt, max_chars=MAX_CHARS - 10)
    except ValueError as exc:
        assert str(exc)
        return

    assert accepted == prompt
    assert prompt.strip() and len(prompt) <= MAX_CHARS - 10
    prompt.encode("utf-8")  # no lone surrogate: a tokenizer can take it
    controls = {c for c in prompt if unicodedata.category(c) == "Cc"}
    assert controls <= {"\t", "\n", "\r"}


@FUZZ
@given(awkward_text)
def test_any_prompt_gets_an_analysis_or_a_message(http, prompt):
    reply = http.call(
        "pages.attention",
        "analyse",
        {
            "attention-analyse.n_clicks": 1,
            "attention-prompt.value": prompt,
            "attention-model.value": DEMO_MODEL,
        },
    )

    assert reply.status == 200 and "Traceback" not in reply.text
    assert not reply.side  # the page handled it; nothing fell through to the app-wide alert
    try:
        validate_prompt(prompt)
    except ValueError as exc:
        assert reply.get("attention-alert.is_open") is True
        assert reply.get("attention-alert.children") == str(exc)
        return
    assert reply.get("attention-alert.is_open") is False
    chips = reply.get("attention-token-strip.children")["props"]["children"]
    assert len(chips) == reply.get("attention-analysis.data")["n_pos"]


query_values = st.one_of(
    st.text(max_size=12), st.integers(-(10**12), 10**12).map(str), st.just("%00")
)
queries = st.one_of(
    st.dictionaries(
        st.sampled_from(["model", "prompt", "layer", "head", "token", "truncate", "pos", "x"]),
        query_values,
        max_size=5,
    ).map(lambda query: "?" + urlencode(query)),
    st.text(max_size=40).map(lambda raw: "?" + raw),  # not even a well-formed query
)


@pytest.mark.parametrize("path", ["/", "/retention", "/heads"])
def test_any_link_opens_its_page(http, path):
    @FUZZ
    @given(queries)
    def opens(search):
        props = render_page(http, path, search)

        assert any(key.endswith("-alert") for key in props)  # the page, not an error page
        if path == "/":
            # ...and the page's first callback copes with whatever the layout took from it.
            values = initial_values(http, props, "pages.attention", "analyse")
            loaded = http.call("pages.attention", "analyse", values, changed=[])
            assert loaded.status == 200 and not loaded.side, loaded.side

    opens()
