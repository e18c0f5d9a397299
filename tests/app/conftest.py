"""The app imported once per test session, with its job cache in a temporary directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def memlens_app(tmp_path_factory):
    """The ``app`` module; importing it creates the Dash app and registers every page."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMLENS_CACHE_DIR", str(tmp_path_factory.mktemp("app-cache")))
    import app

    yield app
    patch.undo()


@pytest.fixture
def attention_page(memlens_app, cache_dir):
    """The Attention page module, with a fresh analysis cache for this test."""
    from pages import attention

    return attention
