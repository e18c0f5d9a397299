"""Whose job a background callback runs, and the limit and timeout around it."""

from __future__ import annotations

import base64
import contextvars

import pytest
from dash._callback_context import context_value
from dash._utils import AttributeDict

from analysis import jobs
from analysis.settings import Settings
from components.jobs import BROWSER_COOKIE, LOCAL_OWNER, job_owner, limited_job


def in_request(fn, *, headers=None, cookies=None, remote="10.0.0.7"):
    """Run ``fn`` with the callback context Dash gives a background job for such a request."""

    def run():
        context_value.set(
            AttributeDict(headers=headers or {}, cookies=cookies or {}, remote=remote)
        )
        return fn()

    return contextvars.copy_context().run(run)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def limits(cache_dir, monkeypatch):
    """One job per owner, 30 s each."""
    monkeypatch.setenv("MEMLENS_MAX_JOBS_PER_USER", "1")
    monkeypatch.setenv("MEMLENS_JOB_TIMEOUT_S", "30")
    return Settings.from_env()


def test_owner_outside_a_request_is_local():
    assert job_owner() == LOCAL_OWNER


def test_owner_is_the_browser_cookie_without_auth():
    owner = in_request(job_owner, cookies={BROWSER_COOKIE: "abc123"}, headers=basic("ada", "x"))
    assert owner == "browser:abc123"  # an Authorization header means nothing with auth off


def test_owner_falls_back_to_the_client_address():
    assert in_request(job_owner) == "address:10.0.0.7"


def test_owner_is_the_auth_user_when_auth_is_on(monkeypatch):
    monkeypatch.setenv("MEMLENS_AUTH_USERS", "ada:pw,bob:pw")
    cookies = {BROWSER_COOKIE: "abc123"}

    assert in_request(job_owner, headers=basic("ada", "pw"), cookies=cookies) == "user:ada"
    # Header names arrive in any case.
    lower = {"authorization": basic("bob", "pw")["Authorization"]}
    assert in_request(job_owner, headers=lower, cookies=cookies) == "user:bob"
    # A malformed header cannot name a user; the browser id still counts.
    bad = {"Authorization": "Basic !!!"}
    assert in_request(job_owner, headers=bad, cookies=cookies) == "browser:abc123"


def refuse(message: str):
    return ("no update", message)


def test_limited_job_runs_and_passes_progress_through(limits):
    reported = []

    @limited_job(refuse)
    def job(set_progress, value):
        set_progress((1, 2, "half"))
        assert jobs.running_jobs(LOCAL_OWNER, limits) == 1
        return ("done", value)

    assert job(reported.append, 7) == ("done", 7)
    assert reported == [(1, 2, "half")]
    assert jobs.running_jobs(LOCAL_OWNER, limits) == 0


def test_limited_job_refuses_an_owner_at_the_limit(limits):
    ran = []

    @limited_job(refuse)
    def job(set_progress):
        ran.append(True)
        return ("done", None)

    cookies = {BROWSER_COOKIE: "tab-1"}
    with jobs.job_slot("browser:tab-1", limits):
        result = in_request(lambda: job(lambda _: None), cookies=cookies)
        other = in_request(lambda: job(lambda _: None), cookies={BROWSER_COOKIE: "tab-2"})

    assert result[0] == "no update"
    assert "You already have 1 job running" in result[1]
    assert other == ("done", None) and ran == [True]


def test_limited_job_stops_a_job_past_its_timeout(limits, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])
    steps = []

    @limited_job(refuse)
    def job(set_progress):
        for step in range(5):
            set_progress((step, 5, ""))
            steps.append(step)
            clock[0] += 10  # each step takes 10 s; the timeout is 30 s
        return ("done", None)

    result = job(lambda _: None)
    assert result[0] == "no update" and "longer than 30 s" in result[1]
    assert steps == [0, 1, 2]
    assert jobs.running_jobs(LOCAL_OWNER, limits) == 0


def test_limited_job_lets_other_errors_through(limits):
    @limited_job(refuse)
    def job(set_progress):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        job(lambda _: None)
    assert jobs.running_jobs(LOCAL_OWNER, limits) == 0
