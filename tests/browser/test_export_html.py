"""Exported HTML opens offline in headless Chromium and shows its plots, fetching nothing.

Chromium runs with the flags of ``scripts/chromium-offline`` (read from that file, so the
export browser and this test cannot drift apart), and Chrome's performance log records every
request the page makes.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import zipfile

import numpy as np
import pytest

from components import export
from components.heatmaps import make_attention_heatmap
from tests.components.test_export import make_report_inputs

pytestmark = pytest.mark.browser

TOKENS = ["<|endoftext|>", "The", " cat", " sat", ".", " The", " cat"]
LOAD_TIMEOUT_S = 120
# How many plot divs hold a drawn plot.
DRAWN = (
    "return Array.from(document.querySelectorAll('.plotly-graph-div'))"
    ".filter(div => div.querySelector('.main-svg') !== null).length"
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "chrome-extension:")


def offline_flags() -> list[str]:
    """The Chromium flags of ``scripts/chromium-offline``."""
    script = export.CHROMIUM_WRAPPER.read_text()
    command = script.split('exec "$chromium"', 1)[1].replace("\\\n", " ")
    return [word for word in shlex.split(command) if word.startswith("--")]


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = export.CHROMIUM
    for flag in offline_flags():
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(options=options)
    browser.set_page_load_timeout(LOAD_TIMEOUT_S)
    yield browser
    browser.quit()


def wait_for_plots(driver, path) -> None:
    """Load ``path`` and wait until every Plotly div on it has drawn its SVG."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(path.as_uri())
    divs = driver.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    assert divs >= 1
    WebDriverWait(driver, LOAD_TIMEOUT_S).until(lambda d: d.execute_script(DRAWN) == divs)


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call, from Chrome's performance log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def pattern(n_pos: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    scores = rng.random((n_pos, n_pos)) * np.tril(np.ones((n_pos, n_pos)))
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float32)


def test_exported_figure_html_shows_the_plot_offline(driver, tmp_path):
    figure = make_attention_heatmap(pattern(len(TOKENS)), TOKENS, title="L0 H0")
    path = tmp_path / "figure.html"
    path.write_bytes(export.figure_html(figure))

    wait_for_plots(driver, path)

    assert driver.execute_script("return document.querySelector('.plotly .main-svg') !== null")
    assert driver.execute_script("return typeof window.Plotly") == "object"
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?https?:", html)
    urls = requested_urls(driver)
    assert path.as_uri() in urls  # the log does see requests
    assert [url for url in urls if not url.startswith(LOCAL_SCHEMES)] == []


def test_bundle_report_html_shows_every_figure_offline(driver, tmp_path):
    inputs = make_report_inputs()
    content, _ = export.build_bundle(inputs, formats=["html"])
    zipfile.ZipFile(io.BytesIO(content)).extractall(tmp_path)
    n_figures = len(export.report_figures(inputs))

    wait_for_plots(driver, tmp_path / "report.html")

    divs = driver.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    assert divs == n_figures
    remote = [url for url in requested_urls(driver) if not url.startswith(LOCAL_SCHEMES)]
    assert remote == []

    # A page of the bundle's html/ folder loads plotly.min.js from next to it.
    wait_for_plots(driver, tmp_path / "html" / "loss.html")
    assert driver.execute_script("return document.querySelector('.plotly .main-svg') !== null")
    urls = requested_urls(driver)
    assert (tmp_path / "html" / "plotly.min.js").as_uri() in urls  # the log does see requests
    assert [url for url in urls if not url.startswith(LOCAL_SCHEMES)] == []
