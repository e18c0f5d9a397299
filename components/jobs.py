"""Long jobs of the pages: whose they are, and the per-user limit and timeout around them.

Every page background callback (``background=True``) is wrapped in :func:`limited_job`. The
wrapper runs where the job runs (a local job process or a Celery worker) and:

- names the job's owner with :func:`job_owner`: the basic-auth user name when auth is on, else
  the browser's :data:`BROWSER_COOKIE` (set by ``serving.identify_browsers``), else the client
  address;
- takes one of the owner's ``MEMLENS_MAX_JOBS_PER_USER`` slots (:func:`analysis.jobs.job_slot`);
  when none is free the callback returns the page's alert ("you already have N jobs
  running; ...") instead of running;
- checks the ``MEMLENS_JOB_TIMEOUT_S`` deadline each time the job reports progress, and turns a
  job past it into the same alert. A job that stops reporting (one very long forward pass) is
  only stopped by the Celery hard time limit, on Celery workers.

Dash copies the request's cookies and headers into the job's callback context, so this works
the same on every background-callback manager.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable

from dash import callback_context
from dash.exceptions import MissingCallbackContextException

from analysis.jobs import JobLimitError, JobTimeoutError, job_slot
from analysis.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# A random id per browser, set by the server on the first response (serving.identify_browsers).
BROWSER_COOKIE = "memlens_browser"
LOCAL_OWNER = "local"  # a job called outside any request (tests, scripts)


def _basic_auth_user(headers: dict) -> str | None:
    """The user name of a ``Basic`` Authorization header, None when there is none."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = str(value).partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        name, sep, _ = base64.b64decode(token, validate=True).decode().partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return name if sep and name else None


def job_owner(settings: Settings | None = None) -> str:
    """Who the current callback's job counts against.

    ``user:<name>`` when basic auth is on (the server checked the password before the job
    started), else ``browser:<id>`` from :data:`BROWSER_COOKIE`, else ``address:<ip>``;
    :data:`LOCAL_OWNER` outside a request.
    """
    settings = settings or get_settings()
    try:
        headers = dict(callback_context.headers or {})
        cookies = dict(callback_context.cookies or {})
        remote = callback_context.remote or ""
    except MissingCallbackContextException:
        return LOCAL_OWNER
    if settings.auth_users or settings.auth_token:
        user = _basic_auth_user(headers)
        if user:
            return f"user:{user}"
    browser = cookies.get(BROWSER_COOKIE)
    if browser:
        return f"browser:{str(browser)[:64]}"
    return f"address:{remote or 'unknown'}"


def limited_job(refuse: Callable[[str], tuple]) -> Callable:
    """Decorate a background callback so it runs in one of its owner's job slots.

    Args:
        refuse: Turns a message into the callback's return value that shows it (the page's
            alert, every other output left as it is).

    Returns:
        A decorator for a callback whose first argument is ``set_progress``. Put it below
        ``@callback(...)``.
    """

    def decorate(job: Callable) -> Callable:
        @functools.wraps(job)
        def limited(set_progress, *args, **kwargs):
            owner = job_owner()
            try:
                with job_slot(owner) as slot:

                    def report(value) -> None:
                        slot.check_deadline()
                        set_progress(value)

                    return job(report, *args, **kwargs)
            except (JobLimitError, JobTimeoutError) as exc:
                logger.info("%s for %s: %s", job.__name__, owner, exc)
                return refuse(str(exc))

        return limited

    return decorate
