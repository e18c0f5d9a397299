"""The Retention and Heads pages in headless Chromium: what only a browser shows."""

from __future__ import annotations

import json
import time

import pytest
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The machine may be busy; an analysis on the demo model takes well under this.
WAIT = 120
PROMPT = "One two three four. One two three four."


def wait_until(condition, timeout=WAIT, interval=0.25):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s")


def drawn(dash_duo, graph_id: str) -> dict | None:
    """The first trace's values and the title of a figure as plotly.js drew them."""
    text = dash_duo.driver.execute_script(
        """
        const gd = document.querySelector(arguments[0] + ' .js-plotly-plot');
        if (!gd || !gd._fullData || !gd._fullData.length) { return null; }
        const z = gd._fullData[0].z;
        return JSON.stringify({
            z: z ? Array.from(z, row => Array.from(row)) : null,
            title: gd._fullLayout.title.text,
        });
        """,
        f"#{graph_id}",
    )
    return json.loads(text) if text else None


def test_analyse_then_switching_metric_redraws_the_residual_stream(dash_duo, memlens_app):
    from pages import retention

    dash_duo.start_server(memlens_app.app)
    dash_duo.driver.get(f"{dash_duo.server_url}/retention")
    # The page analyses the example on load and writes it into the prompt box: wait for that.
    wait_until(lambda: "prompt=" in dash_duo.driver.current_url)
    box = dash_duo.find_element(f"#{retention.PANEL.prompt}")
    box.send_keys(Keys.CONTROL, "a")  # clear() bypasses React, which then keeps the old text
    box.send_keys(Keys.DELETE)
    box.send_keys(PROMPT)
    wait_until(lambda: box.get_attribute("value") == PROMPT)
    dash_duo.find_element(f"#{retention.PANEL.analyse}").click()
    wait_until(lambda: "prompt=One+two" in dash_duo.driver.current_url)  # analysed
    before = wait_until(
        lambda: (view := drawn(dash_duo, retention.RESID)) and "Cosine" in view["title"] and view
    )

    Select(dash_duo.find_element(f"#{retention.METRIC}")).select_by_value("norm")

    after = wait_until(
        lambda: (view := drawn(dash_duo, retention.RESID)) and "Norm" in view["title"] and view
    )
    n_tokens = len(dash_duo.find_elements(f"#{retention.STRIP} button"))
    assert len(after["z"][0]) == n_tokens  # one column per token
    assert after["z"] != before["z"]
    assert "metric=norm" in dash_duo.driver.current_url
    dash_duo.wait_for_contains_text(f"#{retention.RESID_CAPTION}", "L2 norm", timeout=WAIT)
    assert dash_duo.get_logs() == [], "the browser console reported errors"


def test_clicking_a_head_score_opens_it_on_the_attention_page(dash_duo, memlens_app):
    from pages import heads

    dash_duo.start_server(memlens_app.app)
    dash_duo.driver.get(f"{dash_duo.server_url}/heads")
    wait_until(lambda: drawn(dash_duo, heads.HEATMAP) and drawn(dash_duo, heads.HEATMAP)["z"])

    cells = wait_until(lambda: dash_duo.find_elements(f"#{heads.TABLE} td"))
    next(cell for cell in cells if cell.text == "L0 H1").click()

    wait_until(lambda: "head=1" in dash_duo.driver.current_url)
    assert "layer=0" in dash_duo.driver.current_url
    dash_duo.wait_for_contains_text("#attention-head-caption", "L0 H1", timeout=WAIT)
