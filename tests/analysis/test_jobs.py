"""Job slots: the per-user limit on running jobs and the job timeout."""

from __future__ import annotations

import json
import subprocess
import sys

import diskcache
import pytest

from analysis import jobs
from analysis.settings import REPO_ROOT, Settings


def settings_with(tmp_path, **env) -> Settings:
    return Settings.from_env({"MEMLENS_CACHE_DIR": str(tmp_path), **env})


def test_job_slots_limit_one_owner_not_others(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")

    with jobs.job_slot("ada", settings):
        with (
            pytest.raises(jobs.JobLimitError, match="already have 1 job running") as refused,
            jobs.job_slot("ada", settings),
        ):
            pass
        assert "MEMLENS_MAX_JOBS_PER_USER" in str(refused.value)
        assert jobs.running_jobs("ada", settings) == 1
        with jobs.job_slot("bob", settings):
            assert jobs.running_jobs("bob", settings) == 1
    assert jobs.running_jobs("ada", settings) == 0
    with jobs.job_slot("ada", settings):  # released after the first job ended
        pass


def test_limit_counts_every_running_job_of_the_owner(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="2")

    with (
        jobs.job_slot("ada", settings),
        jobs.job_slot("ada", settings),
        pytest.raises(jobs.JobLimitError, match="already have 2 jobs running"),
        jobs.job_slot("ada", settings),
    ):
        pass


def test_job_slot_is_released_when_the_job_fails(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")

    with pytest.raises(RuntimeError, match="crashed"), jobs.job_slot("s", settings):
        raise RuntimeError("job crashed")
    with jobs.job_slot("s", settings):
        pass


def test_stale_slots_expire_after_the_job_timeout(tmp_path, monkeypatch):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1", MEMLENS_JOB_TIMEOUT_S="5")
    clock = [1000.0]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])

    slot = jobs.job_slot("s", settings)
    slot.__enter__()  # a job that never released its slot, in a process still alive
    with pytest.raises(jobs.JobLimitError), jobs.job_slot("s", settings):
        pass
    clock[0] += 10
    with jobs.job_slot("s", settings):
        pass


def test_slot_of_a_killed_process_is_dropped_at_once(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")
    # A job process takes a slot and dies without releasing it (as Cancel's SIGKILL does).
    script = (
        "import os, sys\n"
        "from analysis import jobs\n"
        "from analysis.settings import REPO_ROOT, Settings\n"
        f"settings = Settings.from_env({{'MEMLENS_CACHE_DIR': {str(tmp_path)!r}}})\n"
        "held = jobs.job_slot('s', settings)\n"
        "held.__enter__()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT)
    with diskcache.Cache(str(tmp_path / jobs.SLOTS_DIR)) as slots:
        assert len(json.loads(slots.get("running:s"))) == 1  # the dead job's slot is there

    assert jobs.running_jobs("s", settings) == 0
    with jobs.job_slot("s", settings):
        pass


def test_slot_taken_on_another_machine_counts_until_the_timeout(tmp_path, monkeypatch):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1", MEMLENS_JOB_TIMEOUT_S="60")
    slot = jobs.job_slot("s", settings)
    slot.__enter__()
    monkeypatch.setattr(jobs.socket, "gethostname", lambda: "another-web-machine")

    assert jobs.running_jobs("s", settings) == 1
    with pytest.raises(jobs.JobLimitError), jobs.job_slot("s", settings):
        pass


def test_slot_reports_its_deadline(tmp_path, monkeypatch):
    settings = settings_with(tmp_path, MEMLENS_JOB_TIMEOUT_S="30")
    clock = [50.0]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])

    with jobs.job_slot("s", settings) as slot:
        assert not slot.should_stop()
        slot.check_deadline()
        clock[0] += 30
        assert slot.should_stop()
        with pytest.raises(jobs.JobTimeoutError, match="longer than 30 s"):
            slot.check_deadline()


def test_planted_pickle_in_the_slots_is_never_loaded(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")
    with diskcache.Cache(str(tmp_path / jobs.SLOTS_DIR)) as slots:
        slots.set("running:s", Exploding())  # stored as a pickle

    with jobs.job_slot("s", settings):
        assert jobs.running_jobs("s", settings) == 1


class Exploding:
    """Unpickling it fails the test: the slots must never unpickle."""

    def __reduce__(self):
        return (pytest.fail, ("a slot record was unpickled",))


def test_record_that_is_not_json_is_replaced(tmp_path):
    settings = settings_with(tmp_path, MEMLENS_MAX_JOBS_PER_USER="1")
    with diskcache.Cache(str(tmp_path / jobs.SLOTS_DIR)) as slots:
        slots.set("running:s", "{not json")

    with jobs.job_slot("s", settings):
        assert jobs.running_jobs("s", settings) == 1
