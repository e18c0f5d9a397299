"""Team serving: auth, browser ids and where long jobs run."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import dash
import pytest
import requests
from dash import CeleryManager, DiskcacheManager, html

import serving
from analysis.settings import Settings
from bench.processes import free_port, start, stop
from components.jobs import BROWSER_COOKIE


def settings_with(tmp_path, **env) -> Settings:
    return Settings.from_env({"MEMLENS_CACHE_DIR": str(tmp_path), **env})


def tiny_app():
    app = dash.Dash(__name__)
    app.layout = html.Div("hello", id="hello")
    return app


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_auth_is_off_by_default(tmp_path):
    app = tiny_app()
    assert serving.enable_auth(app, settings_with(tmp_path)) is False
    assert app.server.test_client().get("/").status_code == 200


def test_basic_auth_users(tmp_path):
    app = tiny_app()
    serving.enable_auth(app, settings_with(tmp_path, MEMLENS_AUTH_USERS="ada:s3cret,bob:pw"))
    client = app.server.test_client()

    assert client.get("/").status_code == 401
    assert client.get("/", headers=basic("ada", "wrong")).status_code == 401
    assert client.get("/", headers=basic("ada", "s3cret")).status_code == 200
    assert client.get("/", headers=basic("bob", "pw")).status_code == 200


def test_team_token_works_with_any_name(tmp_path):
    app = tiny_app()
    serving.enable_auth(app, settings_with(tmp_path, MEMLENS_AUTH_TOKEN="team-token"))
    client = app.server.test_client()

    assert client.get("/", headers=basic("anyone", "team-token")).status_code == 200
    assert client.get("/", headers=basic("anyone", "guess")).status_code == 401


@pytest.mark.parametrize("header", ["Bearer abc", "Basic", "Basic !!!not-base64", "Basic Zm9v"])
def test_malformed_auth_header_gets_401_not_500(tmp_path, header):
    app = tiny_app()
    serving.enable_auth(app, settings_with(tmp_path, MEMLENS_AUTH_TOKEN="t"))
    assert app.server.test_client().get("/", headers={"Authorization": header}).status_code == 401


def test_bad_auth_users_setting_is_explained(tmp_path):
    with pytest.raises(ValueError, match="name:password"):
        serving.enable_auth(tiny_app(), settings_with(tmp_path, MEMLENS_AUTH_USERS="ada"))


def test_every_browser_gets_an_id_cookie_once(tmp_path):
    app = tiny_app()
    serving.identify_browsers(app.server)
    client = app.server.test_client()

    first = client.get("/")
    cookie = first.headers.get("Set-Cookie", "")
    assert cookie.startswith(f"{BROWSER_COOKIE}=") and "HttpOnly" in cookie
    # The browser sends it back from then on, and keeps the same id.
    assert "Set-Cookie" not in client.get("/").headers
    other = app.server.test_client().get("/").headers.get("Set-Cookie", "")
    assert other.split(";")[0] != cookie.split(";")[0]


def test_manager_is_diskcache_without_redis(tmp_path):
    manager, celery_app = serving.make_background_manager(settings_with(tmp_path))
    assert isinstance(manager, DiskcacheManager) and celery_app is None
    assert isinstance(manager.handle.disk, serving.JobCacheDisk)  # JSON, never pickles


def test_manager_is_celery_with_redis(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_REDIS_URL="redis://127.0.0.1:1/0")
    manager, celery_app = serving.make_background_manager(settings)
    assert isinstance(manager, CeleryManager)
    assert celery_app.conf.broker_url == "redis://127.0.0.1:1/0"
    # Jobs stop themselves at the timeout; the worker kills a stuck one a minute later.
    assert celery_app.conf.task_time_limit == 900 + 60


def test_long_jobs_run_below_the_web_workers_cpu_priority(tmp_path):
    manager, _ = serving.make_background_manager(settings_with(tmp_path))
    seen = tmp_path / "niceness"

    def job_fn(key, progress_key, args, context):  # what Dash runs in the job process
        seen.write_text(str(os.nice(0)))

    pid = manager.call_job_fn("key", job_fn, (), {})
    os.waitpid(pid, 0)

    expected = min(19, os.nice(0) + serving.LocalJobManager.JOB_NICENESS)
    assert int(seen.read_text()) == expected


def test_a_warmed_up_worker_has_its_model_and_the_collector_skips_what_it_holds(tmp_path):
    # In a process of its own: gc.freeze() here would change the test run's own collector.
    script = (
        "import gc, serving\n"
        "from analysis import models\n"
        "serving.warm_up(freeze=True)\n"
        "print(gc.get_freeze_count(), len(models._loaded))\n"
    )
    env = {**os.environ, "MEMLENS_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )

    frozen, loaded = (int(word) for word in done.stdout.split())
    assert loaded == 1  # the default model, before any request
    assert frozen > 100_000  # the libraries and the model, out of the collector's walk


@pytest.mark.slow
def test_plain_gunicorn_serves_the_app_with_the_serve_commands_settings(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MEMLENS_CACHE_DIR": str(tmp_path / "cache"),
        "MEMLENS_PORT": str(port),
        "MEMLENS_WORKERS": "1",
        "MEMLENS_REDIS_URL": "",
    }
    log = tmp_path / "gunicorn.log"
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    server = start([gunicorn, "app:server"], env, log)  # gunicorn.conf.py is read from the repo
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "gunicorn did not answer"
            try:
                page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except requests.RequestException:  # not listening yet, or still warming up
                time.sleep(0.5)
    finally:
        stop([server])

    assert page.status_code == 200 and '"_dash-config"' in page.text
    text = log.read_text()
    assert f"Listening at: http://127.0.0.1:{port}" in text  # MEMLENS_HOST's default, not 0.0.0.0
    assert "Using worker: gthread" in text
