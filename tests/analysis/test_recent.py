"""The recent-analyses list: order, bound, persistence, atomic writes, several processes."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from analysis.recent import MAX_RECENT, RecentAnalysis, recent, recent_path, record


def _record_many(prefix: str, count: int) -> None:
    for index in range(count):
        record("memlens-demo", f"{prefix} {index}")


def test_recent_lists_newest_first_with_what_was_recorded(cache_dir):
    record("memlens-demo", "first", options={"top_k": 5}, url="/attention?layer=0")
    record("gpt2", "second")

    entries = recent()

    assert [e.prompt for e in entries] == ["second", "first"]
    assert entries[1] == RecentAnalysis(
        model="memlens-demo",
        prompt="first",
        options={"top_k": 5},
        time=entries[1].time,
        url="/attention?layer=0",
    )
    assert entries[1].time.endswith("Z")


def test_list_lives_in_the_cache_dir_and_is_read_back_from_disk(cache_dir):
    record("memlens-demo", "kept across a restart")

    # Nothing is held in memory: the file alone is the list a new process would read.
    assert recent_path() == cache_dir / "recent.json"
    stored = json.loads(recent_path().read_text(encoding="utf-8"))
    assert [e["prompt"] for e in stored["entries"]] == ["kept across a restart"]


def test_recording_an_analysis_again_moves_it_to_the_top_without_a_duplicate(cache_dir):
    record("memlens-demo", "a")
    record("memlens-demo", "b")
    record("memlens-demo", "a")

    assert [e.prompt for e in recent()] == ["a", "b"]


def test_list_keeps_only_the_newest_entries(cache_dir):
    for index in range(MAX_RECENT + 7):
        record("memlens-demo", f"prompt {index}")

    entries = recent(limit=1000)

    assert len(entries) == MAX_RECENT
    assert entries[0].prompt == f"prompt {MAX_RECENT + 6}"
    assert entries[-1].prompt == "prompt 7"


def test_recent_returns_at_most_limit_entries(cache_dir):
    for index in range(5):
        record("memlens-demo", f"p{index}")

    assert [e.prompt for e in recent(limit=2)] == ["p4", "p3"]


def test_recent_is_empty_before_anything_is_recorded(cache_dir):
    assert recent() == []


def test_crash_during_write_leaves_the_old_list_intact(cache_dir, monkeypatch):
    record("memlens-demo", "old")
    before = recent_path().read_bytes()

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    with monkeypatch.context() as patch:
        patch.setattr("analysis.bundle.os.replace", crash)
        with pytest.raises(OSError, match="killed mid-write"):
            record("memlens-demo", "new")

    assert recent_path().read_bytes() == before
    assert [e.prompt for e in recent()] == ["old"]
    leftovers = [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unreadable_file_counts_as_empty_and_is_replaced_by_the_next_record(cache_dir):
    cache_dir.mkdir(parents=True, exist_ok=True)
    recent_path().write_text("{not json", encoding="utf-8")

    assert recent() == []
    record("memlens-demo", "fresh")
    assert [e.prompt for e in recent()] == ["fresh"]


def test_processes_recording_at_once_lose_no_entry(cache_dir):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(name, 15)) for name in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)

    assert [worker.exitcode for worker in workers] == [0, 0]
    prompts = {e.prompt for e in recent(limit=MAX_RECENT)}
    assert prompts == {f"{name} {index}" for name in "ab" for index in range(15)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "", "prompt": "x"}, "model"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": "x", "options": {"bad": object()}}, "JSON"),
        ({"model": "m", "prompt": "x", "limit": 0}, "limit"),
    ],
)
def test_record_rejects_bad_input_and_writes_nothing(cache_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        record(**kwargs)
    assert not os.path.exists(recent_path())


def test_recent_rejects_a_limit_below_one(cache_dir):
    with pytest.raises(ValueError, match="limit"):
        recent(limit=0)
