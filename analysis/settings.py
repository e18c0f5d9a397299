"""Every MemLens setting, declared once with its default and meaning.

Settings come from environment variables (``MEMLENS_*``); command-line flags of ``app.py`` set
the same variables. The README's settings table is checked against :data:`SETTINGS` by a test,
so a setting added here without documentation fails the suite.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no), got {text!r}")


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(part).expanduser().resolve() for part in text.split(os.pathsep) if part)


@dataclass(frozen=True)
class Setting:
    """One setting: its environment variable, default (as text), parser and help."""

    env: str
    default: str
    parse: Callable[[str], Any]
    help: str

    @property
    def attr(self) -> str:
        return self.env.removeprefix("MEMLENS_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("MEMLENS_HOST", "127.0.0.1", str, "Address the server binds to."),
    Setting("MEMLENS_PORT", "8050", int, "Port the server listens on."),
    Setting("MEMLENS_DEBUG", "0", _bool, "Dash debug mode (never on a shared server)."),
    Setting(
        "MEMLENS_CACHE_DIR",
        str(REPO_ROOT / ".memlens-cache"),
        lambda s: Path(s).expanduser().resolve(),
        "Directory of the disk cache shared by all workers (analyses, jobs).",
    ),
    Setting(
        "MEMLENS_CACHE_SIZE_GB",
        "2",
        float,
        "Size bound of the disk cache; least recently used entries are evicted past it.",
    ),
    Setting("MEMLENS_DEFAULT_MODEL", "memlens-demo", str, "Model a new session opens on."),
    Setting(
        "MEMLENS_MODEL_DIRS",
        "",
        _paths,
        "Extra directories (separated by ':') whose checkpoint folders may be loaded by path.",
    ),
    Setting(
        "MEMLENS_DEVICE",
        "auto",
        str,
        "Torch device: 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.",
    ),
    Setting("MEMLENS_MAX_PROMPT_CHARS", "20000", int, "Longest prompt accepted, in characters."),
    Setting(
        "MEMLENS_MAX_TOKENS",
        "1024",
        int,
        "Longest prompt accepted, in tokens (the model's context can lower it further).",
    ),
    Setting("MEMLENS_WORKERS", "2", int, "Web worker processes of `app.py serve` (gunicorn)."),
    Setting(
        "MEMLENS_REDIS_URL",
        "",
        str,
        "Redis URL; when set, long jobs run on Celery workers instead of in the web server.",
    ),
    Setting(
        "MEMLENS_AUTH_USERS",
        "",
        str,
        "Basic-auth users as 'name:password,name:password'; empty turns auth off.",
    ),
    Setting(
        "MEMLENS_AUTH_TOKEN",
        "",
        str,
        "Shared team token, given as the basic-auth password with any user name.",
    ),
    Setting(
        "MEMLENS_MAX_JOBS_PER_USER", "2", int, "Long jobs one browser session may run at once."
    ),
    Setting(
        "MEMLENS_JOB_TIMEOUT_S", "900", float, "A long job is stopped after this many seconds."
    ),
)


@dataclass(frozen=True)
class Settings:
    """The parsed values of :data:`SETTINGS`, read from an environment mapping."""

    host: str
    port: int
    debug: bool
    cache_dir: Path
    cache_size_gb: float
    default_model: str
    model_dirs: tuple[Path, ...]
    device: str
    max_prompt_chars: int
    max_tokens: int
    workers: int
    redis_url: str
    auth_users: str
    auth_token: str
    max_jobs_per_user: int
    job_timeout_s: float

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env, setting.default)
            try:
                values[setting.attr] = setting.parse(raw)
            except ValueError as exc:
                raise ValueError(f"{setting.env}={raw!r} is invalid: {exc}") from None
        return cls(**values)


def get_settings() -> Settings:
    """Current settings; read afresh so tests and the CLI can change the environment."""
    return Settings.from_env()
