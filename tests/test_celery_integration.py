"""A long job through the real stack: a web server, Redis and a Celery worker, as the README's
multi-machine setup runs them, here on loopback.

The test plays the browser over HTTP (Dash's background-callback protocol) and compares the
Celery worker's answer with the same job run in this process.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from analysis.jobs import job_slot
from analysis.prompt_sets import parse_prompt_text, run_prompt_set
from analysis.settings import Settings
from bench.dash_http import DashClient
from bench.processes import free_port, start, stop
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


@pytest.fixture
def team(tmp_path):
    """Redis, one Celery worker (solo pool) and one gunicorn web worker, all on loopback."""
    redis_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MEMLENS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
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
                [str(bin_dir / "celery"), "-A", "app:celery_app", "worker", "--pool=solo"]
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
            "cache_dir": tmp_path / "shared-cache",
            "logs": tmp_path,
            "processes": processes,
        }
    finally:
        stop(processes)


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


def run_prompt_set_job(client: DashClient):
    """Press the Compare page's "Run prompt set" with PROMPTS, and wait for the answer."""
    dependency = client.find("compare-set-table.data", trigger="compare-set-run.n_clicks")
    values = {
        "compare-set-run.n_clicks": 1,
        "compare-set-source.value": "text",
        "compare-set-text.value": PROMPTS,
        "compare-set-measures.value": MEASURES,
        "compare-model.value": MODEL,
    }
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
    # It ran on the worker, not in the web server.
    assert "succeeded" in (team["logs"] / "celery.log").read_text()

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
