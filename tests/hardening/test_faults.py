"""Faults under a running app: it recovers, or its alert says what happened.

Covered elsewhere, and not repeated here: a corrupt entry read through the store API is
recomputed (tests/analysis/test_prompt.py); the job slot of a killed job process is dropped at
once (tests/analysis/test_jobs.py); report bundles and the recent-analyses list are written to a
temporary name and renamed, and keep the old file when the rename fails
(tests/analysis/test_bundle.py, tests/analysis/test_recent.py, tests/components/test_export.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import time

import diskcache
import pytest
from dash.exceptions import BackgroundCallbackError

import serving
from analysis.models import DEMO_MODEL
from analysis.settings import Settings
from analysis.store import ArrayStore
from components.alerts import callback_error_message
from tests.hardening.conftest import alert_text

PROMPT = "A fault in the cache must not lose this prompt."


def analyse(http, prompt=PROMPT):
    return http.call(
        "pages.attention",
        "analyse",
        {
            "attention-analyse.n_clicks": 1,
            "attention-prompt.value": prompt,
            "attention-model.value": DEMO_MODEL,
        },
    )


def show_head(http, data):
    """The head figure the page draws for ``data``, read lazily from the cache."""
    return http.call(
        "pages.attention",
        "show_head",
        {
            "attention-analysis.data": data,
            "attention-layer.value": "1",
            "attention-head.value": "0",
        },
    )


def assert_analysed(reply) -> dict:
    assert reply.status == 200 and "Traceback" not in reply.text
    assert reply.get("attention-alert.is_open") is False, reply.get("attention-alert.children")
    assert not reply.side  # nothing reached the app-wide alert either
    return reply.get("attention-analysis.data")


def assert_head_drawn(reply) -> None:
    assert reply.status == 200 and not reply.side, reply.side
    assert reply.get("attention-head-caption.children").startswith("L1 H0:")
    assert reply.get("attention-head-figure.figure")["data"]


def entries(directory) -> dict:
    """``{key: raw bytes}`` of every entry of the analysis cache, read by a separate handle, as
    another worker process would."""
    store = ArrayStore(directory, 2**30)
    try:
        return {key: store._get(key) for key in store._cache.iterkeys()}
    finally:
        store.close()


# --- The analysis cache --------------------------------------------------------------------


def test_cache_directory_removed_mid_session_is_recreated(http, cache_dir):
    data = assert_analysed(analyse(http))
    shutil.rmtree(cache_dir)

    again = assert_analysed(analyse(http))
    assert_head_drawn(show_head(http, again))

    assert again == data
    # Written to the new directory, where every other process looks, not into the deleted one.
    keys = entries(cache_dir / "analyses")
    assert any(key.endswith("/meta") for key in keys)
    assert any(key.endswith("/attn.1") for key in keys)


def test_corrupt_entries_on_disk_are_recomputed_when_read(http, cache_dir):
    data = assert_analysed(analyse(http))
    directory = cache_dir / "analyses"

    # Scribble over every stored array on disk, in the database and in value files alike.
    with sqlite3.connect(directory / "cache.db") as db:
        db.execute("UPDATE Cache SET value = ? WHERE key NOT LIKE '%/meta'", (b"\x00garbage",))
        files = [row[0] for row in db.execute("SELECT filename FROM Cache WHERE filename != ''")]
    for name in files:
        (directory / name).write_bytes(b"garbage, not an npy file")

    assert_head_drawn(show_head(http, data))

    assert entries(directory)  # rewritten
    for key, blob in entries(directory).items():
        assert blob is not None and b"garbage" not in blob, key


def disk_full_after(allowed: int):
    """A ``diskcache.Cache.set`` that fails with ENOSPC after ``allowed`` writes."""
    real = diskcache.Cache.set
    left = [allowed]

    def set_until_full(cache, *args, **kwargs):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= 1
        return real(cache, *args, **kwargs)

    return set_until_full


def test_full_disk_is_named_in_the_alert_and_nothing_half_written_is_served(
    http, cache_dir, monkeypatch
):
    # The disk fills up after three of the analysis's entries were written.
    with monkeypatch.context() as patch:
        patch.setattr(diskcache.Cache, "set", disk_full_after(3))
        message = alert_text(analyse(http), "attention-alert")

    assert "could not store" in message and "No space left on device" in message
    assert "free disk space" in message
    # Some arrays landed, but not the metadata written last: the analysis does not exist yet.
    written = entries(cache_dir / "analyses")
    assert len(written) == 3
    assert not any(key.endswith("/meta") for key in written)

    # Space freed: the same prompt is analysed completely, not served from the partial entries.
    data = assert_analysed(analyse(http))
    assert_head_drawn(show_head(http, data))
    assert any(key.endswith("/meta") for key in entries(cache_dir / "analyses"))


def test_cache_directory_that_cannot_be_created_is_named_in_the_alert(http, cache_dir, monkeypatch):
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    blocker = cache_dir.parent / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MEMLENS_CACHE_DIR", str(blocker))

    message = alert_text(analyse(http), "attention-alert")

    assert "cannot be opened" in message
    assert "point MEMLENS_CACHE_DIR at a writable directory" in message


# --- Redis down ----------------------------------------------------------------------------

DEAD_REDIS = "redis://127.0.0.1:1/0"  # port 1: nothing listens, the connection is refused


@pytest.fixture
def redis_down_manager(tmp_path):
    settings = Settings.from_env(
        {"MEMLENS_CACHE_DIR": str(tmp_path), "MEMLENS_REDIS_URL": DEAD_REDIS}
    )
    manager, _ = serving.make_background_manager(settings)
    assert isinstance(manager, serving.RedisJobManager)
    return manager


def test_job_while_redis_is_down_fails_fast_with_a_message(redis_down_manager):
    manager = redis_down_manager
    started = time.monotonic()

    job = manager.call_job_fn("key", None, [], {})
    running = manager.job_running(job)
    result = manager.get_result("key", job)
    manager.terminate_job(job)

    assert time.monotonic() - started < 5  # Celery alone retries for much longer
    assert running is False
    error = result["background_callback_error"]
    assert DEAD_REDIS in error["msg"] and "start Redis" in error["msg"]
    assert error["tb"] == ""


def test_redis_going_down_during_a_job_fails_it_with_the_same_message(redis_down_manager):
    manager = redis_down_manager
    started = time.monotonic()

    # A job Celery had taken before Redis went away.
    result = manager.get_result("key", "a3c5e8f0-celery-task-id")

    assert manager.get_progress("key") is None
    assert manager.get_updated_props("key") == {}
    manager.terminate_job("a3c5e8f0-celery-task-id")
    assert time.monotonic() - started < 5
    assert result == manager._failed()


def test_failed_job_reaches_the_alert_as_one_line_without_the_traceback(redis_down_manager):
    error = redis_down_manager._failed()["background_callback_error"]
    # What Dash raises for a failed job, traceback appended.
    exc = BackgroundCallbackError(
        f"An error occurred inside a background callback: {error['msg']}\nTraceback (most ..."
    )

    message = callback_error_message(exc)

    assert message.startswith("A long job failed: long jobs run on Celery workers through Redis")
    assert "Traceback" not in message and "\n" not in message


# --- A job process killed mid-job --------------------------------------------------------


def sleep_then_answer(seconds):
    time.sleep(seconds)
    return ["done"]


@pytest.fixture
def local_manager(tmp_path):
    manager, _ = serving.make_background_manager(
        Settings.from_env({"MEMLENS_CACHE_DIR": str(tmp_path)})
    )
    assert isinstance(manager, serving.LocalJobManager)
    yield manager
    manager.handle.close()


def start_job(manager, key: str, seconds: float) -> int:
    job_fn = manager.make_job_fn(sleep_then_answer, progress=False)
    return manager.call_job_fn(key, job_fn, [seconds], {})


def wait_for_exit(manager, job, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while manager.job_running(job):
        assert time.monotonic() < deadline, "the job process did not stop"
        time.sleep(0.05)


def test_job_killed_mid_job_is_reported_as_failed(local_manager):
    job = start_job(local_manager, "killed", 60)
    assert local_manager.job_running(job)

    os.kill(job, signal.SIGKILL)  # what the kernel's OOM killer does
    wait_for_exit(local_manager, job)
    result = local_manager.get_result("killed", job)

    assert result["background_callback_error"]["msg"] == serving.LocalJobManager.DIED_MESSAGE


def test_cancelled_job_is_not_reported_as_failed(local_manager):
    job = start_job(local_manager, "cancelled", 60)

    local_manager.terminate_job(job)  # what Cancel does
    wait_for_exit(local_manager, job)

    assert local_manager.get_result("cancelled", job) is local_manager.UNDEFINED


def test_job_that_finished_returns_its_result(local_manager):
    job = start_job(local_manager, "finished", 0)
    wait_for_exit(local_manager, job)

    assert local_manager.get_result("finished", job) == ["done"]


def test_jobs_run_again_after_the_cache_directory_is_removed(local_manager, tmp_path):
    first = start_job(local_manager, "before", 0)
    wait_for_exit(local_manager, first)
    assert local_manager.get_result("before", first) == ["done"]

    shutil.rmtree(tmp_path)  # the whole MEMLENS_CACHE_DIR, jobs included
    job = start_job(local_manager, "after", 0)
    wait_for_exit(local_manager, job)

    assert local_manager.get_result("after", job) == ["done"]
    # Recreated where every web worker looks, not kept in the deleted database.
    assert (tmp_path / "jobs" / "cache.db").is_file()
