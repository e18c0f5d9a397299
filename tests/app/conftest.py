"""Fixtures of the page-callback tests; ``memlens_app`` comes from tests/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def attention_page(memlens_app, cache_dir):
    """The Attention page module, with a fresh analysis cache for this test."""
    from pages import attention

    return attention
