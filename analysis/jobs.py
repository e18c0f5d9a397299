"""Job slots: how many long jobs one user may run at once, and how long each may run.

A long job (a sweep, a memory horizon, a prompt set) holds one of its owner's
``MEMLENS_MAX_JOBS_PER_USER`` slots while it runs, and must stop once it has run
``MEMLENS_JOB_TIMEOUT_S`` seconds. Slots live in the shared cache directory, so the limit holds
for every web worker and every job worker that shares it, on one machine or several.

A slot is released when its job ends, fails or times out. A job process killed outright (Cancel
ends the process with SIGKILL, so no ``finally`` runs) leaves its slot behind; the next claim on
the same machine sees that the process is gone and drops the slot. A slot taken on another
machine cannot be checked that way and lapses after the job timeout.

Slot records are JSON text, never pickles, like the analysis cache.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import diskcache

from analysis.settings import Settings, get_settings
from analysis.store import CorruptEntryError, ForkSafeCache, NoPickleDisk

logger = logging.getLogger(__name__)

SLOTS_DIR = "slots"
# A pid reused by a new process has a different start time; this much clock jitter is allowed.
_START_TIME_TOLERANCE_S = 0.5


class JobLimitError(RuntimeError):
    """The owner already runs as many long jobs as ``MEMLENS_MAX_JOBS_PER_USER`` allows."""

    def __init__(self, running: int, limit: int):
        self.running = running
        self.limit = limit
        jobs = "job" if running == 1 else "jobs"
        super().__init__(
            f"You already have {running} {jobs} running; wait for one to finish or cancel it "
            f"(at most {limit} per user, MEMLENS_MAX_JOBS_PER_USER)."
        )


class JobTimeoutError(RuntimeError):
    """A job ran past ``MEMLENS_JOB_TIMEOUT_S`` and was stopped."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(
            f"The job ran longer than {timeout_s:g} s and was stopped "
            "(MEMLENS_JOB_TIMEOUT_S); try a shorter prompt or fewer options."
        )


@dataclass(frozen=True)
class JobSlot:
    """A held slot: who holds it, since when, and the job's deadline.

    Attributes:
        owner: The user the slot counts against.
        started: ``time.time()`` when the slot was taken.
        timeout_s: Seconds the job may run.
    """

    owner: str
    started: float
    timeout_s: float

    def should_stop(self) -> bool:
        """True once the job has run past its timeout (for the analysis ``should_stop`` hooks)."""
        return time.time() - self.started >= self.timeout_s

    def check_deadline(self) -> None:
        """Raise :class:`JobTimeoutError` once the job has run past its timeout."""
        if self.should_stop():
            raise JobTimeoutError(self.timeout_s)


def _process_start(pid: int) -> float | None:
    """Start time of a live process on this machine, or None when it is gone (or a zombie)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with dash's DiskcacheManager extra
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.NoSuchProcess:
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "born": _process_start(os.getpid())}


def _alive(record: dict, now: float, timeout_s: float) -> bool:
    """Whether a slot record still counts: not past the timeout, and its process not gone."""
    if now - float(record.get("start", 0.0)) >= timeout_s:
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine: only the timeout tells
    born = _process_start(int(record.get("pid", -1)))
    if born is None:
        return False
    recorded = record.get("born")
    return recorded is None or not born or abs(born - float(recorded)) < _START_TIME_TOLERANCE_S


def _open_slots(settings: Settings) -> diskcache.Cache:
    return ForkSafeCache(str(settings.cache_dir / SLOTS_DIR), disk=NoPickleDisk)


def _read(slots: diskcache.Cache, key: str) -> dict[str, dict]:
    try:
        raw = slots.get(key)
        records = json.loads(raw) if isinstance(raw, str) else {}
    except (CorruptEntryError, ValueError):
        logger.warning("job slot record %s is unreadable; starting afresh", key)
        return {}
    return records if isinstance(records, dict) else {}


def running_jobs(owner: str, settings: Settings | None = None) -> int:
    """How many jobs ``owner`` runs now (slots held by live processes, within the timeout)."""
    settings = settings or get_settings()
    with _open_slots(settings) as slots:
        records = _read(slots, f"running:{owner}")
    now = time.time()
    return sum(_alive(record, now, settings.job_timeout_s) for record in records.values())


@contextmanager
def job_slot(owner: str, settings: Settings | None = None) -> Iterator[JobSlot]:
    """Hold one of ``owner``'s job slots while the ``with`` block runs.

    Args:
        owner: Who the job counts against (a user name or a browser id); empty means
            ``"anonymous"``.
        settings: Limits and cache directory; the current settings if None.

    Yields:
        The :class:`JobSlot`; long jobs poll its :meth:`JobSlot.should_stop` or
        :meth:`JobSlot.check_deadline` to honour ``MEMLENS_JOB_TIMEOUT_S``.

    Raises:
        JobLimitError: ``owner`` already holds ``MEMLENS_MAX_JOBS_PER_USER`` live slots.
    """
    settings = settings or get_settings()
    owner = owner or "anonymous"
    key = f"running:{owner}"
    slot_id = uuid.uuid4().hex
    slots = _open_slots(settings)
    try:
        # Count live slots and take one in a single transaction, so two workers cannot both
        # take the last one.
        with slots.transact():
            now = time.time()
            records = {
                sid: record
                for sid, record in _read(slots, key).items()
                if _alive(record, now, settings.job_timeout_s)
            }
            if len(records) >= settings.max_jobs_per_user:
                logger.info("job refused for %s: %d running", owner, len(records))
                raise JobLimitError(len(records), settings.max_jobs_per_user)
            records[slot_id] = {"start": now, **_this_process()}
            slots.set(key, json.dumps(records), expire=settings.job_timeout_s)
        slot = JobSlot(owner=owner, started=now, timeout_s=settings.job_timeout_s)

        try:
            yield slot
        finally:
            with slots.transact():
                records = _read(slots, key)
                records.pop(slot_id, None)
                slots.set(key, json.dumps(records), expire=settings.job_timeout_s)
    finally:
        slots.close()
