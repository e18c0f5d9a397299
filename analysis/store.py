"""The disk cache of analyses: arrays as ``.npy`` bytes, never pickles.

diskcache stores ``bytes`` values raw and pickles anything else. :class:`NoPickleDisk` refuses
both ways, so a pickle planted in the cache directory is reported as a corrupt entry instead of
being executed, and arrays always come back through ``np.load(..., allow_pickle=False)``.

The cache is a SQLite-indexed directory, safe to share between threads and processes, bounded in
size with least-recently-used eviction.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import sqlite3
import threading
import zlib
from pathlib import Path

import diskcache
import numpy as np

logger = logging.getLogger(__name__)

# Attention weights are stored as fixed-point uint16 with this many steps per unit, so the
# round-off is at most 1 / (2 * ATTN_SCALE) = 1.2e-4, inside the 1e-3 the views promise; the
# many near-zero weights then compress well.
ATTN_SCALE = 4096
_RAW, _ZLIB = b"N", b"Z"


class CorruptEntryError(Exception):
    """A cache entry exists but cannot be decoded; callers recompute it."""


class CacheWriteError(ValueError):
    """The disk cache could not be opened or could not store an entry: the disk is full, or the
    directory is gone, read-only or not a directory. A ValueError, so pages show its message in
    their alert."""


# SQLite and fork(). Dash starts each long job by forking the web worker. SQLite keeps the locks
# of all connections to a database file in one table per process; a child forked while another
# thread of the parent was inside a statement or a transaction inherits that table with the lock
# still marked held, by a connection no thread of the child will ever finish. Every write of the
# child then waits on it forever (diskcache retries a busy database), and so do the parent's
# writers once the child holds a lock of its own: under load, the server stopped answering.
# So every use of a disk cache holds this lock, and a fork takes it too: it waits until no
# thread is inside SQLite, and no thread enters until the fork is done.
_sqlite_gate = threading.RLock()


def sqlite_gate() -> threading.RLock:
    """The lock each disk-cache call holds and each ``os.fork()`` takes (see above)."""
    return _sqlite_gate


def _renew_gate_in_child() -> None:
    global _sqlite_gate
    _sqlite_gate = threading.RLock()  # only the forking thread lives on: start unlocked


os.register_at_fork(
    before=lambda: sqlite_gate().acquire(),
    after_in_parent=lambda: sqlite_gate().release(),
    after_in_child=_renew_gate_in_child,
)


def _gated(name: str):
    """``diskcache.Cache.<name>``, called with :func:`sqlite_gate` held."""

    @functools.wraps(getattr(diskcache.Cache, name))
    def call(self, *args, **kwargs):
        with sqlite_gate():
            self._reopen_if_removed()
            return getattr(diskcache.Cache, name)(self, *args, **kwargs)

    return call


class ForkSafeCache(diskcache.Cache):
    """A ``diskcache.Cache`` whose every call holds :func:`sqlite_gate`, so that no process is
    forked while a thread of it is inside SQLite. Values are read whole inside the call
    (``read=True`` file handles are not offered).

    With ``reopen=True`` it also reopens itself, recreating its directory, once its database
    file is gone (the directory removed under a running server): without that it would go on
    using the deleted file, unseen by every other process, and a process forked from it could
    not open the database at all. Dash's job functions hold their cache object for the life
    of the server, so the object itself must heal.
    """

    def __init__(self, directory=None, timeout=60, disk=diskcache.Disk, *, reopen=False, **kw):
        self._reopen_args = (directory, timeout, disk, kw) if reopen else None
        self._database = None
        super().__init__(directory, timeout, disk, **kw)
        self._database = self._database_identity()

    def _database_identity(self) -> tuple[int, int] | None:
        """``(device, inode)`` of the database file, None when there is none."""
        try:
            stat = os.stat(os.path.join(self.directory, diskcache.core.DBNAME))
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def _reopen_if_removed(self) -> None:
        if self._reopen_args is None or self._database is None:
            return  # not asked to, or still opening
        if self._database_identity() == self._database:
            return
        logger.warning("cache directory %s vanished; recreating it", self.directory)
        directory, timeout, disk, kw = self._reopen_args
        self.close()
        diskcache.Cache.__init__(self, directory, timeout, disk, **kw)
        self._database = self._database_identity()

    @contextlib.contextmanager
    def transact(self, retry: bool = False):
        with sqlite_gate(), super().transact(retry):
            yield


_CACHE_CALLS = (
    *("set", "add", "get", "pop", "delete", "touch", "incr", "decr", "expire", "evict"),
    *("cull", "clear", "check", "volume", "__contains__", "__getitem__", "__setitem__"),
    *("__delitem__", "__len__"),
)
for _name in _CACHE_CALLS:
    setattr(ForkSafeCache, _name, _gated(_name))


class NoPickleDisk(diskcache.Disk):
    """A diskcache ``Disk`` that stores and returns only str and bytes, never pickles."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if not read and not isinstance(value, (bytes, str)):
            raise TypeError(f"the analysis cache stores bytes or str, not {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise CorruptEntryError("refusing to unpickle a cache entry")
        return super().fetch(mode, filename, value, read)


def encode_array(array: np.ndarray, *, compress: bool = False) -> bytes:
    """``.npy`` bytes behind a one-byte marker, zlib-compressed when asked."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    raw = buffer.getvalue()
    return _ZLIB + zlib.compress(raw, 1) if compress else _RAW + raw


# np.load reads the .npy header with ast.literal_eval. On CPython 3.11 two threads building ASTs
# at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905), which the threaded server hit when a page's callbacks read their
# layers in parallel. Reading arrays is memory-bound; one at a time costs little.
_NPY_HEADER_LOCK = threading.Lock()


def decode_array(blob: bytes) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises :class:`CorruptEntryError` on bad bytes."""
    if not isinstance(blob, bytes) or not blob:
        raise CorruptEntryError("empty or non-bytes cache entry")
    marker, body = blob[:1], blob[1:]
    try:
        if marker == _ZLIB:
            body = zlib.decompress(body)
        elif marker != _RAW:
            raise CorruptEntryError(f"unknown array marker {marker!r}")
        with _NPY_HEADER_LOCK:
            return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise CorruptEntryError(f"undecodable array: {exc}") from None


def quantize_attention(pattern: np.ndarray) -> np.ndarray:
    """Attention weights in [0, 1] as uint16 fixed point (see :data:`ATTN_SCALE`)."""
    return np.rint(np.clip(pattern, 0.0, 1.0) * ATTN_SCALE).astype(np.uint16)


def dequantize_attention(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) / ATTN_SCALE


class ArrayStore:
    """Named arrays and JSON documents in a size-bounded, process-safe disk cache."""

    def __init__(self, directory: Path | str, size_limit_bytes: int):
        self.directory = Path(directory)
        try:
            self._cache = ForkSafeCache(
                str(self.directory),
                size_limit=int(size_limit_bytes),
                eviction_policy="least-recently-used",
                disk=NoPickleDisk,
                tag_index=True,
                reopen=True,  # a directory removed under a running server is recreated
            )
        except (OSError, sqlite3.Error) as exc:
            raise CacheWriteError(
                f"the analysis cache in {self.directory} cannot be opened ({exc}); point "
                "MEMLENS_CACHE_DIR at a writable directory"
            ) from None

    def put_array(self, key: str, array: np.ndarray, *, tag: str, compress: bool = False) -> None:
        self._set(key, encode_array(array, compress=compress), tag)

    def get_array(self, key: str) -> np.ndarray | None:
        """The array under ``key``, None when absent; CorruptEntryError when unreadable."""
        blob = self._get(key)
        return None if blob is None else decode_array(blob)

    def put_json(self, key: str, document: dict, *, tag: str) -> None:
        self._set(key, json.dumps(document, ensure_ascii=False).encode(), tag)

    def get_json(self, key: str) -> dict | None:
        blob = self._get(key)
        if blob is None:
            return None
        try:
            document = json.loads(blob)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptEntryError(f"undecodable JSON entry {key!r}: {exc}") from None
        if not isinstance(document, dict):
            raise CorruptEntryError(f"JSON entry {key!r} is not an object")
        return document

    def evict(self, tag: str) -> None:
        """Drop every entry written with ``tag`` (one analysis)."""
        self._cache.evict(tag)

    def volume(self) -> int:
        """Bytes on disk."""
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()

    def _set(self, key: str, blob: bytes, tag: str) -> None:
        try:
            self._cache.set(key, blob, tag=tag, retry=True)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheWriteError(
                f"the analysis cache in {self.directory} could not store {key.split('/')[-1]!r} "
                f"({exc}); free disk space, or point MEMLENS_CACHE_DIR at a writable directory"
            ) from None

    def _get(self, key: str) -> bytes | None:
        try:
            value = self._cache.get(key, default=None, retry=True)
        except CorruptEntryError:
            raise
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            # A value file removed under us, or a cache directory that vanished.
            raise CorruptEntryError(f"cache read failed for {key!r}: {exc}") from None
        if value is not None and not isinstance(value, bytes):
            raise CorruptEntryError(f"entry {key!r} is {type(value).__name__}, not bytes")
        return value


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def key_lock(key: str) -> threading.Lock:
    """One lock per cache key in this process, so two threads never compute the same entry."""
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


_stores: dict[tuple[str, int], ArrayStore] = {}


def default_store() -> ArrayStore:
    """The process's store on ``MEMLENS_CACHE_DIR``/analyses, opened once per directory."""
    from analysis.settings import get_settings

    settings = get_settings()
    directory = settings.cache_dir / "analyses"
    size = int(settings.cache_size_gb * 1024**3)
    key = (str(directory), size)
    if key not in _stores:
        _stores[key] = ArrayStore(directory, size)
    return _stores[key]
