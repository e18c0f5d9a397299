"""Serving MemLens to a team: gunicorn workers, optional auth, and where long jobs run.

- ``python app.py serve --workers 4`` starts gunicorn on ``app:server``; every worker shares the
  one disk cache and loads each model once.
- ``MEMLENS_AUTH_USERS`` or ``MEMLENS_AUTH_TOKEN`` turn on basic auth (dash-auth).
- ``MEMLENS_REDIS_URL`` moves long jobs (Dash background callbacks) from a local process pool
  (``DiskcacheManager``) to Celery workers over Redis (``CeleryManager``), which can run on
  other machines: ``celery -A app:celery_app worker``.
- Every browser gets a random id cookie, so the per-user job limit
  (``MEMLENS_MAX_JOBS_PER_USER``, :mod:`components.jobs`) has someone to count against when
  auth is off.
- The local job cache keeps results as JSON, never pickles (:class:`JobCacheDisk`), and a job
  whose process died says so (:class:`LocalJobManager`), as does one whose Celery worker died
  (:class:`RedisJobManager`); a request no page makes gets a 4xx, not a 500
  (:func:`answer_bad_requests`); a Redis that does not answer is named in the page's alert.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hmac
import json
import logging
import os
import threading
import time
import uuid

import diskcache
from dash import CeleryManager, DiskcacheManager
from plotly.utils import PlotlyJSONEncoder

from analysis.settings import Settings, get_settings
from analysis.store import ForkSafeCache
from components.jobs import BROWSER_COOKIE

logger = logging.getLogger(__name__)


def make_celery(redis_url: str, job_timeout_s: float | None = None):
    """A Celery app on ``redis_url`` (broker and result backend).

    Jobs stop themselves at ``job_timeout_s`` (:mod:`components.jobs`); a minute later the
    worker kills any that did not (a hard time limit, honoured by the prefork pool).
    """
    try:
        from celery import Celery
    except ImportError:  # pragma: no cover - celery is in requirements.txt
        raise RuntimeError("MEMLENS_REDIS_URL needs Celery: pip install 'celery[redis]'") from None
    celery_app = Celery("memlens", broker=redis_url, backend=redis_url)
    celery_app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        broker_connection_retry_on_startup=True,
        # A taken job reads STARTED (with the worker's host and pid), not PENDING like a queued
        # one: RedisJobManager needs that to tell a job whose worker died.
        task_track_started=True,
    )
    if job_timeout_s:
        celery_app.conf.task_time_limit = hard_time_limit_s(job_timeout_s)
    _answer_roll_call(celery_app)
    return celery_app


# Every running Celery worker writes its name and the time into this Redis sorted set every
# WORKER_BEAT_S seconds, so a web worker can tell a job queued behind others from a job that no
# worker will ever take (none is running).
WORKERS_KEY = "memlens-celery-workers"
WORKER_BEAT_S = 5.0


def _answer_roll_call(celery_app) -> None:
    """Make each worker of ``celery_app`` note itself in :data:`WORKERS_KEY` while it runs."""
    from celery.signals import worker_ready

    def beat(name: str) -> None:
        while True:
            try:
                now = time.time()
                client = celery_app.backend.client
                client.zadd(WORKERS_KEY, {name: now})
                client.zremrangebyscore(WORKERS_KEY, 0, now - 60 * WORKER_BEAT_S)
            except _redis_errors() as exc:
                logger.warning("cannot note this worker in Redis: %s", exc)
            time.sleep(WORKER_BEAT_S)

    def start_beating(sender=None, **_) -> None:
        if getattr(sender, "app", celery_app) is not celery_app:
            return  # another Celery app in this process
        name = getattr(sender, "hostname", None) or f"celery@{os.getpid()}"
        threading.Thread(target=beat, args=(name,), name="memlens-roll-call", daemon=True).start()

    worker_ready.connect(start_beating, weak=False)


def workers_alive(celery_app) -> int:
    """How many Celery workers noted themselves in Redis within the last three beats."""
    return int(
        celery_app.backend.client.zcount(WORKERS_KEY, time.time() - 3 * WORKER_BEAT_S, "+inf")
    )


def hard_time_limit_s(job_timeout_s: float) -> int:
    """When a Celery worker kills a job that did not stop itself at ``job_timeout_s``."""
    return int(job_timeout_s) + 60


class JobCacheError(ValueError):
    """An entry of the local job cache is not what MemLens writes (a planted pickle, say)."""


class JobCacheDisk(diskcache.Disk):
    """The local job cache's storage: values as JSON text (bytes stay bytes), never pickles.

    Dash's ``DiskcacheManager`` keeps job results, progress and its signing secret in this
    cache; diskcache would pickle them, and unpickle whatever it later finds there. Here a
    pickled entry is refused (:class:`JobCacheError`) and never run. Results are encoded as
    ``CeleryManager`` encodes them (plotly's JSON encoder), so pages see the same values.
    """

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if not read and not isinstance(value, bytes):
            value = json.dumps(value, cls=PlotlyJSONEncoder)
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise JobCacheError(
                "a long job's cache entry is a pickle, which MemLens never writes; it was not "
                "loaded. Check who writes to MEMLENS_CACHE_DIR/jobs, then run the job again"
            )
        data = super().fetch(mode, filename, value, read)
        if not isinstance(data, str):
            return data
        try:
            return json.loads(data)
        except ValueError:
            raise JobCacheError("a long job's cache entry is not JSON; run the job again") from None

    def get(self, key, raw):
        if not raw:  # a pickled key: only ever listed, never needed
            raise JobCacheError("the job cache holds a pickled key; it was not loaded")
        return super().get(key, raw)


JOB_DIED_MESSAGE = (
    "the long job stopped before it finished: its process ended without a result (killed, "
    "or out of memory). Run it again; if it keeps stopping, try a shorter prompt or fewer "
    "items"
)


def _failed_job(message: str) -> dict:
    """A job result that Dash reads as a failed job: the app's ``on_error`` handler shows
    ``message`` in the app-wide alert."""
    return {"background_callback_error": {"msg": message, "tb": ""}}


class LocalJobManager(DiskcacheManager):
    """Dash's ``DiskcacheManager``, telling a job that died from one that was cancelled.

    Dash reads a job process that is gone without a result as cancelled and leaves the page as
    it was, so a job killed by the kernel (out of memory) or by ``kill -9`` looked like nothing
    had happened. Here Cancel (and a newer run replacing a job) marks the job in the cache, and
    a job gone without a result and without that mark fails with a message. An entry the cache
    refuses (:class:`JobCacheError`) fails the job the same way, and is dropped.
    """

    CANCELLED_PREFIX = "memlens-cancelled-"
    DIED_MESSAGE = JOB_DIED_MESSAGE

    # Long jobs run below the web workers' CPU priority, so that on a busy machine a sweep takes
    # the cores the clicks leave over, not the other way round.
    JOB_NICENESS = 10

    def call_job_fn(self, key, job_fn, args, context):
        niceness = self.JOB_NICENESS

        def run_nicely(*job_args):  # the body of the forked job process
            os.nice(niceness)
            return job_fn(*job_args)

        return super().call_job_fn(key, run_nicely, args, context)

    def _cancelled_key(self, job) -> str:
        return f"{self.CANCELLED_PREFIX}{job}"

    def terminate_job(self, job):
        if job:
            # Kept as long as results are: a page stops polling a cancelled job well before.
            self.handle.set(self._cancelled_key(job), 1, expire=self.expire or 3600)
        super().terminate_job(job)

    def get_result(self, key, job):
        try:
            result = super().get_result(key, job)
            if result is not self.UNDEFINED or not job or self.job_running(job):
                return result
            # Gone: read once more, for a job that wrote its result and exited since.
            result = super().get_result(key, job)
            if result is not self.UNDEFINED or self.handle.get(self._cancelled_key(job)):
                return result
        except JobCacheError as exc:
            logger.warning("job cache entry %s refused: %s", key, exc)
            self.clear_cache_entry(key)
            return _failed_job(str(exc))
        logger.warning("long job %s ended without a result", job)
        return _failed_job(self.DIED_MESSAGE)

    def get_progress(self, key):
        try:
            return super().get_progress(key)
        except JobCacheError as exc:
            logger.warning("job progress entry refused: %s", exc)
            self.clear_cache_entry(self._make_progress_key(key))
            return None

    def get_updated_props(self, key):
        try:
            return super().get_updated_props(key)
        except JobCacheError as exc:
            logger.warning("job side-update entry refused: %s", exc)
            self.clear_cache_entry(self._make_set_props_key(key))
            return {}

    def get_or_create_signing_secret(self, generate):
        try:
            return super().get_or_create_signing_secret(generate)
        except JobCacheError as exc:
            # Replaced, so one planted entry cannot stop every long job of every worker.
            logger.warning("job signing secret refused (%s); making a new one", exc)
            self.clear_cache_entry(self.SIGNING_SECRET_KEY)
            return super().get_or_create_signing_secret(generate)


# The job id Dash hands the browser when Redis did not take the job: every later question about
# it answers "not running, failed" without asking Redis, in whichever web worker polls.
UNAVAILABLE_JOB = "redis-unavailable"


def _redis_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, OSError)


class RedisJobManager(CeleryManager):
    """Dash's ``CeleryManager``, saying in the page's alert when Redis does not answer.

    A job that Redis cannot take, or whose result Redis can no longer give, ends as a failed
    job with a message naming the Redis URL (shown by the app's ``on_error`` handler), instead
    of a request that hangs through Celery's retries and fails with a 500.

    A job whose worker died fails with a message too, where Dash would read it as cancelled or
    poll it for ever: Celery marks a job FAILURE without a result when the worker's pool
    process is killed (out of memory, ``kill -9``, the hard time limit); a job still STARTED
    ``lost_after_s`` after a web worker first saw it start has outlived the hard time limit, so
    its worker (or its machine) is gone. A job still queued ``queued_grace_s`` after it was first
    polled, while no worker answers the roll call (:data:`WORKERS_KEY`), has nobody to run it.
    """

    SEEN_PREFIX = "memlens-seen-"

    def __init__(
        self,
        celery_app,
        redis_url: str,
        *,
        lost_after_s: float,
        queued_grace_s: float = 3 * WORKER_BEAT_S,
        **kwargs,
    ) -> None:
        super().__init__(celery_app, **kwargs)
        self.redis_url = redis_url
        self.lost_after_s = lost_after_s
        self.queued_grace_s = queued_grace_s

    def _seen_for(self, job, state: str) -> float:
        """Seconds since a web worker first saw ``job`` in ``state``; every web worker polling
        it agrees, since the first sighting is kept in Redis."""
        key = f"{self.SEEN_PREFIX}{state.lower()}-{job}"
        client = self.handle.backend.client
        client.set(key, repr(time.time()), nx=True, ex=int(self.lost_after_s * 2) + 60)
        return time.time() - float(client.get(key) or time.time())

    def lost_message(self, job) -> str | None:
        """Why ``job`` can no longer answer, None while it may (queued, running, done)."""
        task = self.get_task(job)
        if task.state == "FAILURE":
            reason = type(task.result).__name__  # WorkerLostError, TimeLimitExceeded, ...
            logger.warning("long job %s failed on its Celery worker (%s)", job, reason)
            return JOB_DIED_MESSAGE
        if task.state == "PENDING":
            if self._seen_for(job, task.state) <= self.queued_grace_s:
                return None
            if workers_alive(self.handle):
                return None  # queued behind other jobs
            logger.warning("long job %s queued, and no Celery worker is running", job)
            return (
                f"no Celery worker is taking long jobs from Redis at {self.redis_url}: start one "
                "(celery -A app:celery_app worker), then run the job again"
            )
        if task.state != "STARTED":
            return None
        running_s = self._seen_for(job, task.state)
        if running_s <= self.lost_after_s:
            return None
        worker = task.info.get("hostname") if isinstance(task.info, dict) else None
        worker = worker or "a Celery worker"
        logger.warning("long job %s on %s silent for %.0f s", job, worker, running_s)
        return (
            f"the long job stopped answering: it has run on {worker} for longer than any job "
            "may, so that worker (or its machine) is gone. Check the job workers, then run the "
            "job again"
        )

    def unavailable_message(self) -> str:
        return (
            f"long jobs run on Celery workers through Redis at {self.redis_url}, which does not "
            "answer; start Redis (or unset MEMLENS_REDIS_URL to run jobs here), then run the "
            "job again"
        )

    def _answers(self) -> bool:
        """Whether Redis answers a ping within a second (Celery would retry for many)."""
        import redis

        try:
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1).ping()
        except _redis_errors() as exc:
            logger.warning("Redis at %s does not answer: %s", self.redis_url, exc)
            return False
        return True

    def _failed(self) -> dict:
        return _failed_job(self.unavailable_message())

    def call_job_fn(self, key, job_fn, args, context):
        if not self._answers():
            return UNAVAILABLE_JOB
        try:
            return super().call_job_fn(key, job_fn, args, context)
        except _redis_errors() as exc:
            logger.warning("Redis at %s refused a job: %s", self.redis_url, exc)
            return UNAVAILABLE_JOB

    def job_running(self, job):
        if job == UNAVAILABLE_JOB:
            return False
        try:
            return super().job_running(job)
        except _redis_errors():
            return False

    def terminate_job(self, job):
        if job == UNAVAILABLE_JOB or not self._answers():  # Celery's revoke retries for seconds
            return
        with contextlib.suppress(*_redis_errors()):
            super().terminate_job(job)

    def get_progress(self, key):
        try:
            return super().get_progress(key)
        except _redis_errors():
            return None

    def get_result(self, key, job):
        if job == UNAVAILABLE_JOB:
            return self._failed()
        try:
            result = super().get_result(key, job)
            if result is not self.UNDEFINED or not job:
                return result
            message = self.lost_message(job)
            if message is None:
                return result
            # Read once more, for a result written just before the worker went.
            result = super().get_result(key, job)
            return _failed_job(message) if result is self.UNDEFINED else result
        except _redis_errors() as exc:
            logger.warning("Redis at %s lost a job's result: %s", self.redis_url, exc)
            return self._failed()

    def get_updated_props(self, key):
        try:
            return super().get_updated_props(key)
        except _redis_errors():
            return {}


def make_background_manager(settings: Settings | None = None):
    """``(manager, celery_app)``: Celery over Redis when configured, else the disk cache."""
    settings = settings or get_settings()
    expire = int(settings.job_timeout_s) * 4
    if settings.redis_url:
        celery_app = make_celery(settings.redis_url, settings.job_timeout_s)
        logger.info("long jobs run on Celery workers at %s", settings.redis_url)
        # Past the hard time limit, and a poll or two, a job still running has lost its worker.
        lost_after_s = hard_time_limit_s(settings.job_timeout_s) + 30
        manager = RedisJobManager(
            celery_app, settings.redis_url, lost_after_s=lost_after_s, expire=expire
        )
        return manager, celery_app
    jobs = ForkSafeCache(str(settings.cache_dir / "jobs"), disk=JobCacheDisk, reopen=True)
    return LocalJobManager(jobs, expire=expire), None


def _auth_users(settings: Settings) -> dict[str, str]:
    users = {}
    for entry in filter(None, (part.strip() for part in settings.auth_users.split(","))):
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise ValueError(
                f"MEMLENS_AUTH_USERS entry {entry.split(':')[0]!r} must look like name:password"
            )
        users[name] = password
    return users


def enable_auth(app, settings: Settings | None = None) -> bool:
    """Protect every route with basic auth when users or a token are configured.

    Returns:
        True when auth is on.
    """
    settings = settings or get_settings()
    users = _auth_users(settings)
    token = settings.auth_token
    if not users and not token:
        return False

    import dash_auth

    def check(username: str, password: str) -> bool:
        if token and hmac.compare_digest(password.encode(), token.encode()):
            return True
        expected = users.get(username)
        return expected is not None and hmac.compare_digest(password.encode(), expected.encode())

    class SafeBasicAuth(dash_auth.BasicAuth):
        """dash-auth answers a malformed Authorization header with a 500; we answer 401."""

        def is_authorized(self):
            try:
                return super().is_authorized()
            except (IndexError, ValueError, UnicodeDecodeError):
                return False

    SafeBasicAuth(app, auth_func=check)
    logger.info("basic auth on (%d users%s)", len(users), ", team token" if token else "")
    return True


def identify_browsers(server) -> None:
    """Give every browser a random :data:`~components.jobs.BROWSER_COOKIE` id on its first
    response, so long jobs can be counted per browser when auth is off."""

    @server.after_request
    def _set_browser_cookie(response):
        from flask import request

        if BROWSER_COOKIE not in request.cookies:
            response.set_cookie(
                BROWSER_COOKIE,
                uuid.uuid4().hex,
                max_age=365 * 24 * 3600,
                httponly=True,
                samesite="Lax",
            )
        return response


def answer_bad_requests(server) -> None:
    """Answer what a browser of the app would never ask with a 4xx and one line, not a 500.

    - a callback request Dash cannot parse (not JSON, no such callback, outputs that do not
      match): 400. Errors inside callbacks never get here: the app's ``on_error`` handler
      (:func:`components.alerts.show_callback_error`) turns them into an alert;
    - a script or style file that Dash does not serve (``/_dash-component-suites/../..``): 404.

    Anything else keeps Flask's own answer: logged, and a bare 500 with no traceback.
    """
    from dash.exceptions import DependencyException
    from flask import request
    from werkzeug.exceptions import HTTPException

    text = {"Content-Type": "text/plain; charset=utf-8"}

    @server.errorhandler(Exception)
    def _bad_request(error):
        if isinstance(error, HTTPException):
            return error
        if isinstance(error, DependencyException):
            logger.info("no such component file: %s", request.path[:200])
            return "No such file.", 404, text
        if not request.path.endswith("/_dash-update-component"):
            raise error
        logger.warning("malformed callback request refused: %r", error)
        message = (
            f"MemLens could not read this callback request ({type(error).__name__}); "
            "reload the page."
        )
        return message, 400, text


def warm_up(*, freeze: bool = False) -> None:
    """Import TransformerLens and load the default model before the first visitor needs them.

    ``freeze``: then move every object alive (the app, the libraries, the model) out of the
    garbage collector's sight with ``gc.freeze()``. A full collection walks them all, about
    half a million objects and 300 ms with every thread of the worker stopped; frozen, they
    are never walked again, so no click waits for that.
    """
    import analysis

    try:
        analysis.load_model()
    except ValueError as exc:
        logger.warning("default model not loaded at start-up: %s", exc)
    if freeze:
        gc.collect()
        gc.freeze()


def _worker_ready(worker) -> None:
    """gunicorn's ``post_worker_init`` hook: each worker loads the model before it answers."""
    warm_up(freeze=True)


def gunicorn_options(settings: Settings | None = None) -> dict:
    """The gunicorn settings of a MemLens team server, for ``app.py serve`` and for
    ``gunicorn app:server`` alike (``gunicorn.conf.py`` reads them from here)."""
    settings = settings or get_settings()
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        "worker_class": "gthread",
        "threads": 4,
        "timeout": 120,
        # Longer than a browser's pause between clicks, so that a worker does not close a
        # kept-alive connection just as the next callback is sent on it (a reset request).
        "keepalive": 10,
        "accesslog": None,
        # Links carry the prompt, so a long prompt makes a long request line.
        "limit_request_line": 0,
        "post_worker_init": _worker_ready,
    }


def serve(settings: Settings | None = None) -> None:
    """Run ``app:server`` under gunicorn with ``MEMLENS_WORKERS`` workers."""
    from gunicorn.app.base import BaseApplication

    settings = settings or get_settings()

    class MemLensServer(BaseApplication):
        def load_config(self):
            for name, value in gunicorn_options(settings).items():
                self.cfg.set(name, value)

        def load(self):
            from app import server

            return server

    print(
        f"MemLens at http://{settings.host}:{settings.port}/ ({settings.workers} workers)",
        flush=True,
    )
    MemLensServer().run()


def register(subparsers) -> None:
    """Add the ``serve`` command to ``app.py``'s command line."""
    parser = subparsers.add_parser("serve", help="serve a team with gunicorn workers")
    parser.add_argument("--host", help="address to bind (MEMLENS_HOST)")
    parser.add_argument("--port", type=int, help="port (MEMLENS_PORT)")
    parser.add_argument("--workers", type=int, help="web workers (MEMLENS_WORKERS)")
    parser.add_argument("--cache-dir", help="shared cache directory (MEMLENS_CACHE_DIR)")
    parser.add_argument(
        "--auth-users",
        help="basic auth 'name:password,...' (MEMLENS_AUTH_USERS; prefer the variable: every "
        "user of this machine can read a command line)",
    )
    parser.add_argument("--redis-url", help="run long jobs on Celery (MEMLENS_REDIS_URL)")
    parser.set_defaults(handler=_serve_command)


def apply_flags(args: argparse.Namespace) -> None:
    """Copy command-line flags into the ``MEMLENS_*`` variables, so one set of settings rules."""
    for flag, env in (
        ("host", "MEMLENS_HOST"),
        ("port", "MEMLENS_PORT"),
        ("workers", "MEMLENS_WORKERS"),
        ("cache_dir", "MEMLENS_CACHE_DIR"),
        ("auth_users", "MEMLENS_AUTH_USERS"),
        ("redis_url", "MEMLENS_REDIS_URL"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[env] = str(value)


def _serve_command(args: argparse.Namespace) -> None:
    apply_flags(args)
    serve()
