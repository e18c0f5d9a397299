"""The Attention page in headless Chromium: what only a browser shows."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Generous: on a busy shared machine a page load can take a minute. On an idle one each wait
# ends within a second or two.
WAIT = 180
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


def head_z(dash_duo) -> str:
    """The head heatmap's values as drawn (plotly.js's decoded copy), as JSON text."""
    return dash_duo.driver.execute_script(
        """
        const gd = document.querySelector('#attention-head-figure .js-plotly-plot');
        if (!gd || !gd._fullData || !gd._fullData.length) { return null; }
        return JSON.stringify(Array.from(gd._fullData[0].z, row => Array.from(row)));
        """
    )


def url_query(dash_duo) -> dict[str, str]:
    """The address bar's query parameters, decoded (the first value of each)."""
    query = parse_qs(urlsplit(dash_duo.driver.current_url).query)
    return {key: values[0] for key, values in query.items()}


def clear(element) -> None:
    """Empty a React-controlled text box (selenium's ``clear()`` bypasses React's onChange)."""
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)


def open_and_analyse(dash_duo, app, prompt=PROMPT):
    """Start the app, analyse ``prompt`` and wait for its token strip and head view."""
    dash_duo.start_server(app.app)
    dash_duo.wait_for_element("#attention-head-figure .js-plotly-plot", timeout=WAIT)
    box = dash_duo.find_element("#attention-prompt")
    clear(box)
    box.send_keys(prompt)
    dash_duo.find_element("#attention-analyse").click()
    # The address bar follows the view once the analysis is in.
    wait_until(lambda: url_query(dash_duo).get("prompt") == prompt)
    wait_until(lambda: head_z(dash_duo))


def test_analyse_then_switching_head_redraws_the_heatmap(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app)
    chips = dash_duo.find_elements("#attention-token-strip button")
    before = head_z(dash_duo)

    Select(dash_duo.find_element("#attention-head")).select_by_value("2")

    dash_duo.wait_for_contains_text("#attention-head-caption", "L0 H2", timeout=WAIT)
    after = wait_until(lambda: (z := head_z(dash_duo)) != before and z)
    assert len(json.loads(after)) == len(chips)  # one row per token: no downsampling here
    assert any(chip.text.startswith("·") for chip in chips)  # spaces are shown as ·
    assert dash_duo.get_logs() == [], "the browser console reported errors"


def test_clicking_a_head_in_the_grid_chooses_it(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app)
    dash_duo.wait_for_element("#attention-grid .draglayer .x3y3 .nsewdrag", timeout=WAIT)

    dash_duo.find_element("#attention-grid .draglayer .x3y3 .nsewdrag").click()

    dash_duo.wait_for_contains_text("#attention-head-caption", "L0 H2", timeout=WAIT)
    assert Select(dash_duo.find_element("#attention-head")).first_selected_option.text == "H2"


def test_clicking_a_token_highlights_it_and_shows_its_attention_flow(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app)

    dash_duo.find_elements("#attention-token-strip button")[3].click()

    dash_duo.wait_for_contains_text("#attention-token-flow-caption", "Token 3", timeout=WAIT)
    chip = dash_duo.find_elements("#attention-token-strip button")[3]
    wait_until(lambda: "ml-token-selected" in chip.get_attribute("class"))
    assert url_query(dash_duo)["token"] == "3"


def test_a_copied_link_reopens_the_same_view(dash_duo, memlens_app):
    # Characters that mean something in a URL, and a new line, must survive the round trip.
    prompt = "Tom & Jerry? 50% =off #1 ~ok *yes +plus\nOne two three four."
    open_and_analyse(dash_duo, memlens_app, prompt)
    Select(dash_duo.find_element("#attention-layer")).select_by_value("1")
    Select(dash_duo.find_element("#attention-head")).select_by_value("3")
    dash_duo.wait_for_contains_text("#attention-head-caption", "L1 H3", timeout=WAIT)
    wait_until(lambda: url_query(dash_duo).get("head") == "3")
    link = dash_duo.driver.current_url
    assert url_query(dash_duo) == {
        "model": "memlens-demo",
        "prompt": prompt,
        "layer": "1",
        "head": "3",
    }

    dash_duo.driver.get("about:blank")
    dash_duo.driver.get(link)

    dash_duo.wait_for_contains_text("#attention-head-caption", "L1 H3", timeout=WAIT)
    assert dash_duo.find_element("#attention-prompt").get_attribute("value") == prompt
    assert dash_duo.find_elements("#attention-token-strip button")


def test_an_empty_prompt_shows_a_dismissable_alert_and_keeps_the_view(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app)
    before = head_z(dash_duo)

    clear(dash_duo.find_element("#attention-prompt"))
    dash_duo.find_element("#attention-analyse").click()

    dash_duo.wait_for_contains_text("#attention-alert", "the prompt is empty", timeout=WAIT)
    dash_duo.find_element("#attention-alert .btn-close").click()
    wait_until(lambda: not dash_duo.find_elements("#attention-alert"))
    assert head_z(dash_duo) == before


def test_dark_switch_restyles_page_and_figures(dash_duo, memlens_app):
    open_and_analyse(dash_duo, memlens_app)

    dash_duo.find_element("#app-color-mode").click()

    theme = "return document.documentElement.getAttribute('data-bs-theme')"
    wait_until(lambda: dash_duo.driver.execute_script(theme) == "dark")
    background = (
        "return document.querySelector('#attention-head-figure .js-plotly-plot')"
        "._fullLayout.paper_bgcolor"
    )
    wait_until(lambda: dash_duo.driver.execute_script(background) == "#212529")
