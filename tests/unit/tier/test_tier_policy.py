"""Capacity eviction (LRU, never a chunk being read) and write admission."""

import os

import pytest
from tier_helpers import LAYOUT, make_prompt

from sgl_kvtier.tier import SecondHitAdmit, chunk_path, make_admission
from sgl_kvtier.tier.chunk_file import file_size
from sgl_kvtier.tier.index import ChunkIndex

CHUNK_FILE = file_size(LAYOUT.nbytes)


def test_held_chunks_are_not_evicted_until_released(open_store):
    # A hit found by the scheduler is read later on the loader thread: its chunks are held.
    store = open_store(capacity_bytes=2 * CHUNK_FILE)
    prompt = make_prompt(4)
    prompt.put(store, [0, 1])
    store.flush(10)
    assert store.hold([prompt.keys[0], prompt.keys[3]]) == [prompt.keys[0]]  # what is there
    store.load([prompt.keys[1]])  # 1 is now more recent than 0, but 0 is held
    prompt.put(store, [2])
    store.flush(10)
    assert [k in store._index for k in prompt.keys[:3]] == [True, False, True]
    store.release([prompt.keys[0]])
    prompt.put(store, [3])
    store.flush(10)
    assert prompt.keys[0] not in store._index  # evictable again once released


def test_eviction_removes_least_recently_used_first(open_store):
    store = open_store(capacity_bytes=3 * CHUNK_FILE)
    prompt = make_prompt(5)
    prompt.put(store, [0, 1, 2])
    store.flush(10)
    store.load([prompt.keys[0]])  # 0 becomes the most recently used; 1 is now the oldest
    prompt.put(store, [3])
    store.flush(10)
    assert [k in store._index for k in prompt.keys[:4]] == [True, False, True, True]
    prompt.put(store, [4])
    store.flush(10)
    assert [k in store._index for k in prompt.keys] == [True, False, False, True, True]
    s = store.stats()
    assert s["evictions"] == 2 and s["used_bytes"] <= 3 * CHUNK_FILE
    assert sorted(p.name for p in store.root.rglob("*.kvc")) == sorted(
        f"{prompt.keys[i]}.kvc" for i in (0, 3, 4))


def test_restart_with_a_smaller_capacity_evicts_oldest_writes(open_store):
    store = open_store()
    prompt = make_prompt(4)
    prompt.put(store)
    store.flush(10)
    store.close()
    for i, key in enumerate(prompt.keys):  # file times are coarser than these writes
        os.utime(chunk_path(store.root, key), (1000 + i, 1000 + i))
    store = open_store(capacity_bytes=2 * CHUNK_FILE)
    assert [k in store._index for k in prompt.keys] == [False, False, True, True]


def test_a_chunk_that_cannot_fit_is_refused(open_store):
    store = open_store(capacity_bytes=CHUNK_FILE - 1)
    prompt = make_prompt(1)
    prompt.put(store)
    store.flush(10)
    assert store.stats()["capacity_refusals"] == 1 and store.contains_prefix(prompt.keys) == 0


def test_pinned_chunks_are_never_eviction_candidates():
    index = ChunkIndex()
    for key in "abc":
        index.add(key, 10, mtime_ns=1)
    assert index.pin("a")
    assert [k for k, _, _ in index.oldest_unpinned()] == ["b", "c"]
    assert index.remove_unpinned("a") == 0 and "a" in index
    index.unpin("a")
    # Pinning was a use: "a" is now more recent than "c".
    assert [k for k, _, _ in index.oldest_unpinned()] == ["b", "c", "a"]
    assert index.remove_unpinned("a") == 10 and index.total_bytes == 20


def test_second_hit_writes_only_chunks_offered_twice(open_store):
    store = open_store(admission="second_hit")
    once, twice = make_prompt(2, seed=1), make_prompt(2, seed=2)
    once.put(store)
    twice.put(store)
    twice.put(store)
    store.flush(10)
    assert store.contains_prefix(once.keys) == 0
    assert store.contains_prefix(twice.keys) == 2
    assert store.stats()["admission_refusals"] == 4


def test_second_hit_forgets_beyond_its_window():
    policy = SecondHitAdmit(window=2)
    keys = [f"{i:x}" * 64 for i in range(3)]
    assert not any(policy.admit(k) for k in keys)  # keys[0] falls out of the window
    assert not policy.admit(keys[0])
    assert policy.admit(keys[2])


def test_admission_names():
    assert make_admission("always").admit("0" * 64)
    with pytest.raises(ValueError):
        make_admission("sometimes")


def test_chunks_being_read_are_not_evicted(open_store):
    two = 2 * CHUNK_FILE
    # Reads capped to about half a second, so both are still in flight when the write comes.
    store = open_store(capacity_bytes=two, read_bandwidth_limit=2 * LAYOUT.nbytes / 0.5)
    prompt = make_prompt(3)
    prompt.put(store, [0, 1])
    store.flush(10)
    reads = store.submit_load(prompt.keys[:2])
    prompt.put(store, [2])
    store.flush(10)
    assert all(f.result() is not None for f in reads)
    s = store.stats()
    assert (s["capacity_refusals"], s["evictions"]) == (1, 0)
    assert store.contains_prefix(prompt.keys) == 2
