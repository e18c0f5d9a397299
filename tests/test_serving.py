"""Team serving: auth, per-session job limits and where long jobs run."""

from __future__ import annotations

import base64

import dash
import pytest
from dash import html

import serving
from analysis.settings import Settings


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


def test_job_slots_limit_one_session_not_others(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")

    with serving.job_slot("session-a", settings):
        with (
            pytest.raises(serving.JobLimitError, match="limit 1"),
            serving.job_slot("session-a", settings),
        ):
            pass
        with serving.job_slot("session-b", settings):
            pass
    with serving.job_slot("session-a", settings):  # released after the first job ended
        pass


def test_job_slot_is_released_when_the_job_fails(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")

    with pytest.raises(RuntimeError), serving.job_slot("s", settings):
        raise RuntimeError("job crashed")
    with serving.job_slot("s", settings):
        pass


def test_stale_slots_expire_after_the_job_timeout(tmp_path, monkeypatch):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1", MEMLENS_JOB_TIMEOUT_S="5")
    clock = [1000.0]
    monkeypatch.setattr(serving.time, "time", lambda: clock[0])

    slot = serving.job_slot("s", settings)
    slot.__enter__()  # a worker that died and never released its slot
    clock[0] += 10
    with serving.job_slot("s", settings):
        pass


def test_manager_is_diskcache_without_redis(tmp_path):
    manager, celery_app = serving.make_background_manager(settings_with(tmp_path))
    assert type(manager).__name__ == "DiskcacheManager" and celery_app is None


def test_manager_is_celery_with_redis(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_REDIS_URL="redis://127.0.0.1:1/0")
    manager, celery_app = serving.make_background_manager(settings)
    assert type(manager).__name__ == "CeleryManager"
    assert celery_app.conf.broker_url == "redis://127.0.0.1:1/0"
