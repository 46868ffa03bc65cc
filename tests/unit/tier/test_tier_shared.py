"""Several stores on one folder (data-parallel replicas, two servers of one model), and
storage errors at start-up that must not stop a server.

Two ``ChunkStore`` objects in one process exclude each other exactly as two processes do:
an ``flock`` belongs to an open file description, and each store opens its own.
"""

import os
import subprocess
import sys
import time

import pytest
from tier_helpers import LAYOUT, make_prompt, tier_warnings

from sgl_kvtier.tier import ChunkStore, StoreConfig, chunk_path
from sgl_kvtier.tier.chunk_file import file_size
from sgl_kvtier.tier.recovery import disk_bytes
from sgl_kvtier.tier.usage import USAGE_FILE

CHUNK_FILE = file_size(LAYOUT.nbytes)


@pytest.fixture
def pair(tmp_path):
    """Two stores on the same folder, closed at the end."""
    made = []

    def _open(**settings):
        config = {"root": tmp_path / "tier", "capacity_bytes": 1 << 30, "admission": "always",
                  **settings}
        made.append(ChunkStore(StoreConfig(**config)))
        return made[-1]

    yield _open
    for store in made:
        store.close()


def on_disk(store) -> tuple[set[str], int]:
    files = list(store.root.rglob("*.kvc"))
    return {p.stem for p in files}, sum(disk_bytes(p.stat()) for p in files)


def usage_file(store) -> int:
    return int.from_bytes((store.root / USAGE_FILE).read_bytes()[8:16], "little")


def write(store, prompt, indices=None):
    prompt.put(store, indices)
    assert store.flush(10)


def test_each_store_reads_what_the_other_wrote(pair):
    a, b = pair(), pair()
    pa, pb = make_prompt(3, seed=1), make_prompt(2, seed=2)
    write(a, pa)
    write(b, pb)
    assert b.contains_prefix(pa.keys) == 3 and a.contains_prefix(pb.keys) == 2
    assert all(x is not None for x in b.load(pa.keys) + a.load(pb.keys))
    assert b.stats()["discovered"] == 3 and a.stats()["discovered"] == 2
    names, total = on_disk(a)
    assert len(names) == 5 and usage_file(a) == total


def test_the_capacity_holds_across_stores(pair):
    a, b = pair(capacity_bytes=6 * CHUNK_FILE), pair(capacity_bytes=6 * CHUNK_FILE)
    pa, pb = make_prompt(6, seed=1), make_prompt(3, seed=2)
    write(a, pa)
    write(b, pb)  # b never saw a's chunks: it finds them by rescanning, oldest first
    names, total = on_disk(a)
    assert total <= 6 * CHUNK_FILE and usage_file(a) == total
    assert set(pb.keys) <= names and not {pa.keys[0], pa.keys[1], pa.keys[2]} & names


def test_no_store_deletes_a_chunk_the_other_just_used(pair):
    a, b = pair(capacity_bytes=6 * CHUNK_FILE), pair(capacity_bytes=6 * CHUNK_FILE)
    pa, pb = make_prompt(6, seed=1), make_prompt(3, seed=2)
    write(a, pa)
    assert b.contains_prefix(pa.keys) == 6  # b indexes a's chunks, a's order
    time.sleep(0.02)  # file times must be able to move on
    assert all(x is not None for x in a.load(pa.keys[:3]))  # fresh again, in a
    write(b, pb)  # b must evict 3: the oldest it knows are a's first three, just used
    names, total = on_disk(a)
    assert set(pa.keys[:3]) <= names, "b deleted chunks a had just used"
    assert set(pb.keys) <= names and total <= 6 * CHUNK_FILE and usage_file(a) == total


def test_a_damaged_usage_count_is_recounted(pair):
    a = pair()
    write(a, make_prompt(2, seed=1))
    (a.root / USAGE_FILE).write_bytes(b"garbage")
    write(a, make_prompt(1, seed=2))
    _, total = on_disk(a)
    assert usage_file(a) == total


def test_another_writers_temp_file_survives_a_restart(pair, tmp_path):
    a = pair()
    prompt = make_prompt(1)
    write(a, prompt)
    shard = chunk_path(a.root, prompt.keys[0]).parent
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = shard / f".{prompt.keys[0]}.{writer.pid}.abcd1234.tmp"
        dead = shard / f".{prompt.keys[0]}.999999999.abcd1234.tmp"
        alive.write_bytes(b"being written")
        dead.write_bytes(b"cut short")
        b = pair()
        assert alive.exists() and not dead.exists()
        assert b.stats()["temp_files_removed"] == 1
    finally:
        writer.kill()
        writer.wait()


# ------------------------------------------------------ storage errors at start-up


def test_a_failing_scan_leaves_a_read_only_store_that_still_finds_chunks(pair, tier_log,
                                                                        monkeypatch):
    from sgl_kvtier.tier import faults

    first = pair()
    prompt = make_prompt(2)
    write(first, prompt)
    monkeypatch.setattr(faults, "_FAULTS", {"scan": ("oserror", 0.0)})
    second = pair()
    s = second.stats()
    assert s["writes_enabled"] is False and s["chunks"] == 0
    assert second.contains_prefix(prompt.keys) == 2  # found on disk by lookup
    assert all(x is not None for x in second.load(prompt.keys))
    lines = tier_warnings(tier_log)
    assert sum("cannot scan" in m for m in lines) == 1


def test_an_undeletable_leftover_does_not_stop_the_start(pair, tier_log):
    first = pair()
    prompt = make_prompt(2)
    write(first, prompt)
    shard = chunk_path(first.root, prompt.keys[0]).parent
    # A folder under a stale temporary name: unlink() fails on it, even for root.
    (shard / f".{prompt.keys[0]}.999999999.dead.tmp").mkdir()
    second = pair()
    assert second.stats()["scan_errors"] == 1 and second.contains_prefix(prompt.keys) == 2
    assert second.stats()["writes_enabled"]
    assert sum("cannot delete" in m for m in tier_warnings(tier_log)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="a shard of another user needs root (CI is root)")
def test_a_shard_of_another_user_is_skipped_not_fatal(pair):
    first = pair()
    prompts = [make_prompt(1, seed=s) for s in range(6)]
    for p in prompts:
        write(first, p)
    theirs = chunk_path(first.root, prompts[0].keys[0]).parent
    os.chown(theirs, 65534, 65534)
    second = pair()
    s = second.stats()
    assert s["scan_errors"] >= 1 and s["writes_enabled"]
    mine = [p for p in prompts if chunk_path(first.root, p.keys[0]).parent != theirs]
    assert all(second.contains_prefix(p.keys) == 1 for p in mine)
    assert second.contains_prefix(prompts[0].keys) == 0
