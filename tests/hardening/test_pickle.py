"""A pickle planted in either cache directory is refused and never run.

Anyone who can write to ``MEMLENS_CACHE_DIR`` could otherwise run code in the server: diskcache
unpickles what it finds. The analysis cache (analysis/store.py ``NoPickleDisk``) and the long
jobs' cache (``serving.JobCacheDisk``) store bytes and JSON only. Here the payload is planted
the way diskcache itself would store it, then read through the app's own code paths. The store
API alone is covered in tests/analysis/test_store.py, the job slots in tests/analysis/test_jobs.py.
"""

from __future__ import annotations

import os

import diskcache
import pytest

import serving
from analysis.settings import Settings
from tests.hardening.test_faults import analyse, assert_analysed, assert_head_drawn, show_head


class Detonator:
    """Unpickling this creates ``path``: proof that a pickle ran. ``padding`` makes the pickle
    big enough for diskcache to keep it in a file of its own rather than in its database."""

    def __init__(self, path, padding: int = 0):
        self.path = str(path)
        self.padding = padding

    def __reduce__(self):
        return (os.mkdir, (self.path,), {"padding": "x" * self.padding})


SIZES = [pytest.param(0, id="in-the-database"), pytest.param(100_000, id="in-a-value-file")]


@pytest.mark.parametrize("padding", SIZES)
def test_pickle_in_the_analysis_cache_is_recomputed_not_run(http, cache_dir, tmp_path, padding):
    marker = tmp_path / "pwned"
    data = assert_analysed(analyse(http))
    directory = cache_dir / "analyses"

    # Replace the finished analysis's metadata and one layer with pickles.
    with diskcache.Cache(str(directory)) as raw:
        planted = [key for key in raw.iterkeys() if key.endswith(("/meta", "/attn.1"))]
        assert len(planted) == 2
        for key in planted:
            raw.set(key, Detonator(marker, padding))

    again = assert_analysed(analyse(http))
    assert_head_drawn(show_head(http, again))

    assert again == data
    assert not marker.exists()
    with diskcache.Cache(str(directory)) as raw:
        for key in planted:
            assert isinstance(raw.get(key), bytes)  # recomputed, stored as bytes again


@pytest.fixture
def job_manager(tmp_path):
    settings = Settings.from_env({"MEMLENS_CACHE_DIR": str(tmp_path / "cache")})
    manager, _ = serving.make_background_manager(settings)
    yield manager, tmp_path / "cache" / "jobs"
    manager.handle.close()


@pytest.mark.parametrize("padding", SIZES)
def test_pickle_in_the_job_cache_fails_the_job_and_is_not_run(job_manager, tmp_path, padding):
    manager, directory = job_manager
    marker = tmp_path / "pwned"
    key = "3f1c0ffee"
    with diskcache.Cache(str(directory)) as raw:
        for name in (key, f"{key}-progress", f"{key}-set_props", manager.SIGNING_SECRET_KEY):
            raw.set(name, Detonator(marker, padding))

    result = manager.get_result(key, None)
    progress = manager.get_progress(key)
    side = manager.get_updated_props(key)
    secret = manager.get_or_create_signing_secret(lambda: b"a new secret")

    assert not marker.exists()
    assert "is a pickle, which MemLens never writes" in result["background_callback_error"]["msg"]
    assert progress is None and side == {}
    assert secret == b"a new secret"
    # Each refused entry is gone: the next job starts clean.
    with diskcache.Cache(str(directory)) as raw:
        assert [raw.get(name) for name in (key, f"{key}-progress", f"{key}-set_props")] == [
            None
        ] * 3


def test_job_cache_round_trips_what_dash_stores(job_manager):
    """JSON instead of pickles changes nothing a page sees: results, progress, side updates."""
    from dash import html

    manager, _ = job_manager
    values = {
        "result": [{"figure": {"data": []}}, "text", 3, None, html.Span("ok", id="x")],
        "progress": [0.5, "half"],
        "set_props": {"app-alert": {"is_open": True}},
        "secret": b"\x00\xffbytes",
    }
    for name, value in values.items():
        manager.handle.set(name, value)

    assert manager.handle.get("result") == [
        {"figure": {"data": []}},
        "text",
        3,
        None,
        {
            "props": {"children": "ok", "id": "x"},
            "type": "Span",
            "namespace": "dash_html_components",
        },
    ]
    assert manager.handle.get("progress") == [0.5, "half"]
    assert manager.handle.get("set_props") == {"app-alert": {"is_open": True}}
    assert manager.handle.get("secret") == b"\x00\xffbytes"


def test_job_cache_refuses_to_hand_out_a_pickle_directly(job_manager, tmp_path):
    manager, directory = job_manager
    with diskcache.Cache(str(directory)) as raw:
        raw.set("planted", Detonator(tmp_path / "pwned"))

    with pytest.raises(serving.JobCacheError, match="never writes"):
        manager.handle.get("planted")
    assert not (tmp_path / "pwned").exists()
