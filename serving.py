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
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import uuid

import diskcache

from analysis.settings import Settings, get_settings
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
    )
    if job_timeout_s:
        celery_app.conf.task_time_limit = int(job_timeout_s) + 60
    return celery_app


def make_background_manager(settings: Settings | None = None):
    """``(manager, celery_app)``: Celery over Redis when configured, else the disk cache."""
    from dash import CeleryManager, DiskcacheManager

    settings = settings or get_settings()
    if settings.redis_url:
        celery_app = make_celery(settings.redis_url, settings.job_timeout_s)
        logger.info("long jobs run on Celery workers at %s", settings.redis_url)
        return CeleryManager(celery_app, expire=int(settings.job_timeout_s) * 4), celery_app
    jobs = diskcache.Cache(str(settings.cache_dir / "jobs"))
    return DiskcacheManager(jobs, expire=int(settings.job_timeout_s) * 4), None


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


def serve(settings: Settings | None = None) -> None:
    """Run ``app:server`` under gunicorn with ``MEMLENS_WORKERS`` workers."""
    from gunicorn.app.base import BaseApplication

    settings = settings or get_settings()

    class MemLensServer(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", 4)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", None)
            # Links carry the prompt, so a long prompt makes a long request line.
            self.cfg.set("limit_request_line", 0)

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
    parser.add_argument("--auth-users", help="basic auth 'name:password,...' (MEMLENS_AUTH_USERS)")
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
