"""A long job through the real stack: a web server, Redis and a Celery worker, as the README's
multi-machine setup runs them, here on loopback.

The test plays the browser over HTTP (Dash's background-callback protocol) and compares the
Celery worker's answer with the same job run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests

import serving
from analysis.jobs import job_slot
from analysis.prompt_sets import parse_prompt_text, run_prompt_set
from analysis.settings import Settings
from bench.dash_http import DashClient
from bench.processes import free_port, start, stop
from components.alerts import APP_ALERT
from components.jobs import BROWSER_COOKIE
from tests.conftest import ATOL

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
MODEL = "memlens-demo"
PROMPTS = "\n".join(
    f"The {animal} sat on the mat. The {animal} sat on the mat."
    for animal in ("cat", "dog", "fox", "owl", "bee", "elk")
)
MEASURES = ["mean_loss", "repeated_token_loss", "best_induction_attention"]
START_TIMEOUT_S = 90

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(REDIS).exists(),
        reason="redis-server is not installed (make system-deps installs it)",
    ),
]


@contextmanager
def serve_team(tmp_path: Path, pool: str):
    """Redis, one Celery worker (one process of ``pool``) and one gunicorn web worker, all on
    loopback; yields what the tests need to reach them."""
    redis_port, web_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MEMLENS_REDIS_URL": redis_url,
        "MEMLENS_CACHE_DIR": str(tmp_path / "shared-cache"),
        "MEMLENS_MAX_JOBS_PER_USER": "1",
    }
    env.pop("MEMLENS_AUTH_USERS", None)
    env.pop("MEMLENS_AUTH_TOKEN", None)
    bin_dir = Path(sys.executable).parent
    processes = []
    try:
        processes.append(
            start(
                [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
                + ["--appendonly", "no"],
                env,
                tmp_path / "redis.log",
            )
        )
        processes.append(
            start(
                [str(bin_dir / "celery"), "-A", "app:celery_app", "worker", f"--pool={pool}"]
                + ["-c", "1", "--loglevel=INFO", "--without-gossip", "--without-mingle"],
                env,
                tmp_path / "celery.log",
            )
        )
        processes.append(
            start(
                [sys.executable, "app.py", "serve", "--host", "127.0.0.1"]
                + ["--port", str(web_port), "--workers", "1"],
                env,
                tmp_path / "web.log",
            )
        )
        yield {
            "url": f"http://127.0.0.1:{web_port}",
            "redis_url": redis_url,
            "cache_dir": tmp_path / "shared-cache",
            "logs": tmp_path,
            "processes": processes,
        }
    finally:
        stop(processes)


@pytest.fixture
def team(tmp_path):
    """The README's set-up with a solo-pool worker: the job runs in the worker process."""
    with serve_team(tmp_path, "solo") as servers:
        yield servers


@pytest.fixture
def prefork_team(tmp_path):
    """The same with Celery's default prefork pool: the job runs in a child of the worker."""
    with serve_team(tmp_path, "prefork") as servers:
        yield servers


def wait_until_up(team: dict) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in team["processes"]:
            if process.poll() is not None:
                logs = "".join(p.read_text()[-2000:] for p in team["logs"].glob("*.log"))
                pytest.fail(f"a server process exited with {process.returncode}:\n{logs}")
        try:
            if requests.get(team["url"] + "/", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still importing the app
            pass
        time.sleep(0.5)
    pytest.fail(f"the web server did not answer within {START_TIMEOUT_S}s")


def prompt_set_job(client: DashClient, prompts: str = PROMPTS) -> tuple[dict, dict]:
    """The Compare page's "Run prompt set" callback, and its values for ``prompts``."""
    dependency = client.find("compare-set-table.data", trigger="compare-set-run.n_clicks")
    values = {
        "compare-set-run.n_clicks": 1,
        "compare-set-source.value": "text",
        "compare-set-text.value": prompts,
        "compare-set-measures.value": MEASURES,
        "compare-model.value": MODEL,
    }
    return dependency, values


def run_prompt_set_job(client: DashClient):
    """Press the Compare page's "Run prompt set" with PROMPTS, and wait for the answer."""
    dependency, values = prompt_set_job(client)
    return client.run_background(
        dependency, values, ["compare-set-run.n_clicks"], timeout_s=START_TIMEOUT_S
    )


def test_job_on_a_celery_worker_matches_the_same_job_here(team, store):
    # The job on one machine first, while the servers start.
    local = run_prompt_set(parse_prompt_text(PROMPTS), MODEL, MEASURES, store=store)
    wait_until_up(team)
    client = DashClient(team["url"])
    client.open("/compare")

    result = run_prompt_set_job(client)

    assert result.status == 200
    answer = result.outputs
    assert answer["compare-set-alert"]["is_open"] is False
    rows = answer["compare-set-table"]["data"]
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in local.rows]
    for column in ("mean_loss", "repeated_token_loss", "best_induction_attention"):
        remote_values = np.array([row[column] for row in rows], dtype=float)
        local_values = np.array([row[column] for row in local.rows], dtype=float)
        np.testing.assert_allclose(remote_values, local_values, atol=ATOL, rtol=0)
    # It ran on the worker, not in the web server; the worker answers the roll call.
    assert "succeeded" in (team["logs"] / "celery.log").read_text()
    assert serving.workers_alive(serving.make_celery(team["redis_url"])) == 1

    # The same browser, with its one job slot taken, is told so by the worker.
    owner = f"browser:{client.session.cookies.get(BROWSER_COOKIE)}"
    settings = Settings.from_env(
        {"MEMLENS_CACHE_DIR": str(team["cache_dir"]), "MEMLENS_MAX_JOBS_PER_USER": "1"}
    )
    with job_slot(owner, settings):
        refused = run_prompt_set_job(client)
    alert = refused.outputs["compare-set-alert"]
    assert alert["is_open"] is True
    assert alert["children"].startswith("You already have 1 job running")
    assert "compare-set-table" not in refused.outputs  # nothing else changed


def test_a_job_whose_worker_process_is_killed_fails_with_a_message(prefork_team):
    wait_until_up(prefork_team)
    client = DashClient(prefork_team["url"])
    client.open("/compare")
    celery_app = serving.make_celery(prefork_team["redis_url"])
    # Enough prompts that the job is still running when its process is killed.
    many = "\n".join(f"Prompt number {n} repeats, prompt number {n} repeats." for n in range(400))
    dependency, values = prompt_set_job(client, many)
    outcome = {}

    def press_run():
        outcome["result"] = client.run_background(
            dependency, values, ["compare-set-run.n_clicks"], timeout_s=START_TIMEOUT_S
        )

    browser = threading.Thread(target=press_run)
    browser.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (started := started_tasks(celery_app)):
        assert time.monotonic() < deadline and browser.is_alive(), "the job never started"
        time.sleep(0.2)
    (pid,) = started
    assert pid != prefork_team["processes"][1].pid  # a pool child, not the worker itself

    os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
    browser.join(START_TIMEOUT_S)

    result = outcome["result"]
    assert result.status == 200
    alert = result.side[APP_ALERT]
    assert alert["is_open"] is True
    assert "the long job stopped before it finished" in alert["children"]
    assert "compare-set-table" not in result.outputs  # the page keeps what it showed
    assert "WorkerLostError" in (prefork_team["logs"] / "celery.log").read_text()


def started_tasks(celery_app) -> list[int]:
    """Pids of the processes running a STARTED job, read from Redis as a web worker would."""
    client = celery_app.backend.client
    pids = []
    for key in client.scan_iter("celery-task-meta-*"):
        meta = json.loads(client.get(key))
        if meta.get("status") == "STARTED":
            pids.append(meta["result"]["pid"])
    return pids


@pytest.fixture
def bare_redis(tmp_path):
    """A real Redis and a Celery app on it, with no worker: a web worker's view of the set-up."""
    port = free_port()
    redis = start(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        dict(os.environ),
        tmp_path / "redis.log",
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        celery_app = serving.make_celery(url)
        wait_for_redis(celery_app)
        yield celery_app, url
    finally:
        stop([redis])


def wait_for_redis(celery_app, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            celery_app.backend.client.ping()
            return
        except Exception:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


def test_a_job_still_running_past_every_time_limit_has_lost_its_worker(bare_redis):
    """A worker (or its machine) that died outright marks nothing: the job stays STARTED."""
    celery_app, url = bare_redis
    manager = serving.RedisJobManager(celery_app, url, lost_after_s=1.0)
    # What a worker on another machine wrote when it took the job, before it vanished.
    celery_app.backend.store_result("job-1", {"hostname": "celery@gpu-7", "pid": 4}, "STARTED")

    first = manager.get_result("key-1", "job-1")
    time.sleep(1.5)
    later = manager.get_result("key-1", "job-1")

    assert first is manager.UNDEFINED  # still within the time any job may take
    message = later["background_callback_error"]["msg"]
    assert message.startswith("the long job stopped answering: it has run on celery@gpu-7")


def test_a_queued_job_fails_with_a_message_only_when_no_worker_is_running(bare_redis):
    celery_app, url = bare_redis
    manager = serving.RedisJobManager(celery_app, url, lost_after_s=60, queued_grace_s=0.5)
    # A job nobody took yet reads PENDING.

    first = manager.get_result("key-2", "job-2")
    time.sleep(0.7)
    celery_app.backend.client.zadd(serving.WORKERS_KEY, {"celery@busy": time.time()})
    queued = manager.get_result("key-2", "job-2")  # a worker is up, busy with other jobs
    celery_app.backend.client.delete(serving.WORKERS_KEY)
    alone = manager.get_result("key-2", "job-2")

    assert first is manager.UNDEFINED and queued is manager.UNDEFINED
    message = alone["background_callback_error"]["msg"]
    assert message.startswith(f"no Celery worker is taking long jobs from Redis at {url}")
