"""Shared fixtures: an isolated cache per test, the demo model, and tiny random checkpoints."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

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


@pytest.fixture
def store(cache_dir):
    store = ArrayStore(cache_dir / "analyses", 2**30)
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 4-head random GPT-2 with the demo tokenizer, shared by the session."""
    return make_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


# Known shortcoming, kept visible: the shipped memlens-demo has not yet formed an induction head
# (train_demo's CPU budget ends on the copying plateau; see README "The embedded model"). Tests
# that need one run and are expected to fail; strict, so a retrained model that passes them
# turns this marker into a failure and gets it removed.
needs_trained_induction = pytest.mark.xfail(
    strict=True, reason="memlens-demo has no induction head yet (README: The embedded model)"
)
