"""Real-browser tests: headless Chromium that reaches nothing but localhost.

dash[testing]'s ``dash_duo`` takes its Chrome options from :func:`pytest_setup_options`. The
flags are those of /work/shared/OFFLINE-BROWSER.md: with them Chromium makes no outbound lookup.
selenium 4.2.0 finds /usr/bin/chromedriver on PATH; nothing is downloaded.
"""

from __future__ import annotations

import shutil

import pytest
from selenium.webdriver.chrome.options import Options

CHROMIUM = "/usr/bin/chromium"
OFFLINE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--dns-prefetch-disable",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--window-size=1400,1800",
)


def pytest_setup_options():
    """Chrome options for dash_duo: the system Chromium, headless and offline."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in OFFLINE_FLAGS:
        options.add_argument(flag)
    return options


def pytest_collection_modifyitems(config, items):
    """Skip browser tests, saying how to enable them, where Chromium or its driver is missing."""
    if shutil.which("chromedriver") and shutil.which(CHROMIUM):
        return
    skip = pytest.mark.skip(reason="needs chromium and chromium-driver: make system-deps")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def memlens_app(tmp_path_factory):
    """The ``app`` module, its caches in a temporary directory for the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMLENS_CACHE_DIR", str(tmp_path_factory.mktemp("browser-cache")))
    import analysis
    import app

    # Import TransformerLens and load the demo model before the first page asks for them, so
    # the browser's waits measure the app, not a cold start.
    analysis.available_models()
    analysis.load_model(analysis.DEMO_MODEL)
    yield app
    patch.undo()
