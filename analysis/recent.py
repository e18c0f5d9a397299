"""The server's list of recent analyses, kept on disk so that it survives a restart.

One JSON file, ``recent.json`` in ``MEMLENS_CACHE_DIR``, newest entry first and at most
:data:`MAX_RECENT` entries. Every worker process of the server shares it:

- a writer holds an exclusive lock on ``recent.json.lock`` while it reads, changes and writes
  the list, so two workers recording at once never lose each other's entry;
- the new list goes to a temporary file in the same directory that is flushed, fsynced and then
  moved over the old one with ``os.replace``, which is atomic: a reader (which takes no lock)
  sees the old list or the new one, and a worker killed mid-write leaves the old list intact.

The list is shared by everyone who uses the server: it holds prompts, so do not record
analyses of prompts that some users must not see.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from analysis.bundle import write_atomic
from analysis.settings import get_settings

logger = logging.getLogger(__name__)

RECENT_FILE = "recent.json"
MAX_RECENT = 50
# Waiting longer than this for another worker's write means something is stuck.
LOCK_TIMEOUT_S = 10.0
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RecentAnalysis:
    """One analysis someone ran: enough to list it and to open it again.

    Attributes:
        model: Model id (``memlens-demo``, a TransformerLens name or a checkpoint path).
        prompt: The prompt text.
        options: Analysis options (``top_k``, ``prepend_bos``, ...), JSON-serialisable.
        time: When it ran, UTC, ISO 8601 (``2025-01-31T12:00:00Z``).
        url: The page path and query that shows it, e.g. ``/attention?layer=1``.
    """

    model: str
    prompt: str
    options: dict = field(default_factory=dict)
    time: str = ""
    url: str = ""

    def same_analysis(self, other: RecentAnalysis) -> bool:
        """True when both entries show the same thing (only the time differs)."""
        return (self.model, self.prompt, self.options, self.url) == (
            other.model,
            other.prompt,
            other.options,
            other.url,
        )


def recent_path() -> Path:
    """Where the list lives: ``MEMLENS_CACHE_DIR/recent.json``."""
    return get_settings().cache_dir / RECENT_FILE


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> list[RecentAnalysis]:
    """The stored entries, newest first; an unreadable file counts as an empty list."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        entries = [RecentAnalysis(**entry) for entry in payload["entries"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # Written atomically, so this is a hand edit or another program's file; the next
        # record() replaces it.
        logger.warning("ignoring unreadable recent-analyses file %s (%s)", path, exc)
        return []
    return entries


def record(
    model: str,
    prompt: str,
    *,
    options: Mapping | None = None,
    url: str = "",
    limit: int = MAX_RECENT,
    path: Path | None = None,
) -> RecentAnalysis:
    """Put an analysis at the top of the recent list (moving it there if it is already listed).

    Args:
        model: Model id.
        prompt: The prompt text.
        options: Analysis options; must be JSON-serialisable.
        url: The page path and query that shows the analysis.
        limit: How many entries the list keeps; the oldest drop off.
        path: The list's file; :func:`recent_path` if None.

    Returns:
        The entry as stored (with its time).

    Raises:
        ValueError: Empty model or prompt, options that JSON cannot hold, or a bad ``limit``.
        TimeoutError: Another process held the list's lock for more than :data:`LOCK_TIMEOUT_S`.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("record() needs the model id, got an empty one")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("record() needs the prompt, got an empty one")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    options = dict(options or {})
    try:
        # A JSON round trip, so the stored entry compares equal to the one read back later.
        options = json.loads(json.dumps(options, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"options must be JSON-serialisable: {exc}") from None
    entry = RecentAnalysis(model=model, prompt=prompt, options=options, time=_utc_now(), url=url)

    path = recent_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        entries = [old for old in _read(path) if not old.same_analysis(entry)]
        payload = {
            "format": FORMAT_VERSION,
            "entries": [asdict(kept) for kept in [entry, *entries][:limit]],
        }
        write_atomic(path, json.dumps(payload, ensure_ascii=False, indent=1).encode("utf-8"))
    return entry


def recent(limit: int = 20, *, path: Path | None = None) -> list[RecentAnalysis]:
    """The most recent analyses, newest first.

    Args:
        limit: At most this many entries.
        path: The list's file; :func:`recent_path` if None.

    Returns:
        Up to ``limit`` :class:`RecentAnalysis` entries; empty when nothing was recorded yet.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return _read(recent_path() if path is None else Path(path))[:limit]
