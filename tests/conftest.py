"""Shared fixtures: an isolated cache per test, the demo model, and tiny random checkpoints."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
from dash._callback_context import context_value  # noqa: E402
from dash._utils import AttributeDict  # noqa: E402

from analysis.store import ArrayStore  # noqa: E402
from analysis.testing import make_random_gpt2  # noqa: E402

# One tolerance for comparing float16-stored activations with float32 recomputations.
ATOL = 1e-3


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh MEMLENS_CACHE_DIR for this test only."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("MEMLENS_CACHE_DIR", str(directory))
    return directory


_context_tokens: list = []


def in_callback(prop_id: str | None = None, **context) -> None:
    """Make the next callback call see Dash's request context, as inside a real request:
    ``ctx.triggered_id`` is ``prop_id``'s component (``"id.prop"``), plus any other fields
    (``headers``, ``cookies``, ``remote``). Undone after the test."""
    if prop_id is not None:
        context.setdefault("triggered_inputs", [{"prop_id": prop_id, "value": 1}])
    _context_tokens.append(context_value.set(AttributeDict(context)))


@pytest.fixture(autouse=True)
def _no_callback_context_between_tests():
    """A context set by :func:`in_callback` must not leak into the next test: outside a
    request, code sees no callback context at all."""
    yield
    while _context_tokens:
        context_value.reset(_context_tokens.pop())


@pytest.fixture(scope="session")
def memlens_app(tmp_path_factory):
    """The ``app`` module; importing it creates the Dash app and registers every page. Its job
    cache lives in a temporary directory for the session (tests/browser overrides this fixture
    to load the demo model up front)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMLENS_CACHE_DIR", str(tmp_path_factory.mktemp("app-cache")))
    import app

    yield app
    patch.undo()


@pytest.fixture
def store(cache_dir):
    store = ArrayStore(cache_dir / "analyses", 2**30)
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 4-head random GPT-2 with the demo tokenizer, shared by the session."""
    return make_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
