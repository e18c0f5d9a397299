"""Script in a prompt is shown as text: in a real browser, none of it runs.

The callbacks only ever put the prompt's tokens into plain text children
(tests/hardening/test_bad_inputs.py checks the payload); this checks what Chromium does with
them, typed into the prompt box and then reopened from the link the page writes.
"""

from __future__ import annotations

import time

import pytest

from tests.browser.test_attention_browser import open_and_analyse, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
# An <img src=x> that became an element fails to load at once; give its onerror time to fire.
ONERROR_GRACE_S = 1.0


def strip_text(dash_duo) -> str:
    """The token strip's chips, joined, as the browser renders them."""
    # One script call: the strip may be re-rendered between two WebDriver calls.
    return dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll('#attention-token-strip button'),"
        " chip => chip.textContent).join('')"
    )


def assert_nothing_ran(dash_duo) -> None:
    time.sleep(ONERROR_GRACE_S)
    driver = dash_duo.driver
    assert driver.execute_script("return window.__pwned") is None
    injected = "return document.querySelectorAll('#attention-token-strip script, img').length"
    assert driver.execute_script(injected) == 0
    text = strip_text(dash_duo)
    for literal in ("<script>", "window.__pwned=1", "</script>", "<img", "onerror="):
        assert literal in text, text


def test_script_typed_as_a_prompt_is_shown_as_text_and_never_runs(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app, PAYLOAD)
    wait_until(lambda: "__pwned=1" in strip_text(dash_duo))

    assert_nothing_ran(dash_duo)
    alerts = dash_duo.driver.find_elements("css selector", "#attention-alert")
    assert not any(alert.is_displayed() for alert in alerts)  # a closed alert is not rendered

    # The address bar now holds the prompt; opening that link shows it again, still inert.
    dash_duo.driver.get(dash_duo.driver.current_url)
    wait_until(lambda: "__pwned=1" in strip_text(dash_duo))
    assert_nothing_ran(dash_duo)
    assert dash_duo.get_logs() == [], "the browser console reported errors"
