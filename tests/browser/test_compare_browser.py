"""The Compare page in headless Chromium: two prompts in, both views and the caption out."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The machine may be busy; two analyses on the demo model take well under this.
WAIT = 120
PROMPT_A = "One two three four. One two three four."
PROMPT_B = "Zero. One two three four. One two three four."
FIGURES = (
    "compare-attention-a",
    "compare-attention-b",
    "compare-attention-diff",
    "compare-retention-a",
    "compare-retention-b",
    "compare-retention-diff",
)


def wait_until(condition, timeout=WAIT, interval=0.25):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s")


def drawn_rows(dash_duo, figure_id: str) -> int | None:
    """Rows of the heatmap plotly.js drew in ``figure_id`` (None before it has data)."""
    return dash_duo.driver.execute_script(
        f"""
        const gd = document.querySelector('#{figure_id} .js-plotly-plot');
        if (!gd || !gd._fullData || !gd._fullData.length || !gd._fullData[0].z) {{ return null; }}
        return gd._fullData[0].z.length;
        """
    )


def test_two_prompts_show_both_views_the_difference_and_the_caption(dash_duo, memlens_app):
    dash_duo.start_server(memlens_app.app)
    dash_duo.driver.get(dash_duo.server_url + "/compare")
    dash_duo.wait_for_element("#compare-prompt-a", timeout=WAIT)
    wait_until(lambda: "A − B" in dash_duo.find_element("#compare-caption").text)

    for box_id, prompt in (("#compare-prompt-a", PROMPT_A), ("#compare-prompt-b", PROMPT_B)):
        dash_duo.clear_input(box_id)  # React keeps a plain clear() from reaching the store
        dash_duo.find_element(box_id).send_keys(prompt)
    dash_duo.find_element("label[for='_dbcprivate_radioitems_compare-align_input_match']").click()

    # Changing the alignment compares the prompts in the boxes.
    dash_duo.wait_for_contains_text("#compare-caption", "aligned by matching tokens", timeout=WAIT)
    chips_a = dash_duo.find_elements("#compare-strip-a button")
    chips_b = dash_duo.find_elements("#compare-strip-b button")
    assert len(chips_b) > len(chips_a) > 5
    caption = dash_duo.find_element("#compare-caption").text
    assert f"A has {len(chips_a)} tokens, B {len(chips_b)}" in caption
    rows = {figure: wait_until(lambda f=figure: drawn_rows(dash_duo, f)) for figure in FIGURES}
    assert rows["compare-attention-a"] == len(chips_a)
    assert rows["compare-attention-b"] == len(chips_b)
    assert rows["compare-attention-diff"] <= len(chips_a)

    # Clicking a token of A selects its partner in B.
    chips_a[-1].click()
    wait_until(lambda: "ml-token-selected" in (chips_b[-1].get_attribute("class") or ""))
    assert "ml-token-selected" in chips_a[-1].get_attribute("class")
    assert "prompt_b=Zero." in dash_duo.driver.current_url  # the link reopens this pair
    assert dash_duo.get_logs() == [], "the browser console reported errors"
