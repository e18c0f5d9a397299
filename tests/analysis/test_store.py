"""The analysis cache stores arrays as .npy bytes and never unpickles what it finds on disk."""

from __future__ import annotations

import os
import pickle
import threading

import diskcache
import numpy as np
import pytest

from analysis.store import (
    ATTN_SCALE,
    CorruptEntryError,
    ForkSafeCache,
    decode_array,
    dequantize_attention,
    encode_array,
    quantize_attention,
)


class Detonator:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("compress", [False, True])
def test_arrays_round_trip_exactly(compress):
    array = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float16)
    assert np.array_equal(decode_array(encode_array(array, compress=compress)), array)


def test_attention_quantisation_stays_within_tolerance():
    rng = np.random.default_rng(1)
    pattern = rng.dirichlet(np.ones(64), size=(4, 64)).astype(np.float32)

    restored = dequantize_attention(quantize_attention(pattern))
    assert np.abs(restored - pattern).max() <= 0.5 / ATTN_SCALE + 1e-7
    assert np.abs(restored - pattern).max() < 1e-3


def test_garbage_bytes_raise_corrupt_entry():
    with pytest.raises(CorruptEntryError):
        decode_array(b"Nnot an npy file")
    with pytest.raises(CorruptEntryError):
        decode_array(b"Z\x00\x01")
    with pytest.raises(CorruptEntryError):
        decode_array(b"")


def test_object_arrays_are_refused_on_read():
    buffer = b"N" + pickle.dumps(np.array([object()], dtype=object))
    with pytest.raises(CorruptEntryError):
        decode_array(buffer)


def test_store_refuses_to_write_non_bytes(store):
    with pytest.raises(TypeError):
        store._cache.set("key", {"a": 1})


def test_planted_pickle_is_never_executed(store, tmp_path):
    target = tmp_path / "pwned"
    # Plant a pickled value the way diskcache would store one, bypassing our Disk's guard.
    import diskcache

    raw = diskcache.Cache(str(store.directory))
    raw.set("victim/meta", Detonator(str(target)))
    raw.set("victim/attn.0", Detonator(str(target)))
    raw.close()

    with pytest.raises(CorruptEntryError):
        store.get_json("victim/meta")
    with pytest.raises(CorruptEntryError):
        store.get_array("victim/attn.0")
    assert not target.exists()


def test_json_documents_round_trip(store):
    store.put_json("k/meta", {"tokens": [1, 2], "text": "naïve ✓"}, tag="k")
    assert store.get_json("k/meta") == {"tokens": [1, 2], "text": "naïve ✓"}


def test_evict_drops_one_analysis_only(store):
    store.put_array("a/x", np.zeros(3), tag="a")
    store.put_array("b/x", np.ones(3), tag="b")

    store.evict("a")
    assert store.get_array("a/x") is None
    assert np.array_equal(store.get_array("b/x"), np.ones(3))


def _write_in_child(cache, queue) -> None:
    try:
        cache.set("from-child", b"x", retry=False)
        queue.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        queue.put(type(exc).__name__)


def _fork_during_a_transaction(cache) -> str:
    """Fork while another thread is inside a write transaction; what the child's write gave."""
    import multiprocessing

    inside, release = threading.Event(), threading.Event()

    def hold_a_transaction():
        with cache.transact():
            cache.set("from-thread", b"y")
            inside.set()
            release.wait(5)

    holder = threading.Thread(target=hold_a_transaction)
    holder.start()
    inside.wait(5)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    # A fork that waits for the transaction needs the holder to finish; let it go shortly.
    threading.Timer(0.3, release.set).start()
    child = context.Process(target=_write_in_child, args=(cache, queue))
    child.start()
    child.join(30)
    holder.join()
    return queue.get(timeout=5) if child.exitcode == 0 else f"exit {child.exitcode}"


def test_a_job_forked_mid_transaction_can_still_write(tmp_path):
    # Dash forks a web worker for every long job while other threads serve requests.
    cache = ForkSafeCache(str(tmp_path / "safe"), timeout=2)

    assert _fork_during_a_transaction(cache) == "ok"
    assert cache.get("from-child") == b"x"


def test_a_plain_diskcache_forked_mid_transaction_cannot_write(tmp_path):
    # The hazard ForkSafeCache exists for: the child inherits SQLite's lock table with the
    # parent thread's lock still marked held, and its own write can never get the database.
    cache = diskcache.Cache(str(tmp_path / "plain"), timeout=2)

    assert _fork_during_a_transaction(cache) == "Timeout"
