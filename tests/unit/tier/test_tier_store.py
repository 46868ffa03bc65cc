"""ChunkStore round trips, corruption handling, restart recovery and file permissions."""

import os
import stat

import pytest
import torch
from tier_helpers import FP, LAYOUT, make_prompt, tier_warnings

from sgl_kvtier.tier import ChunkStore, StoreConfig, alloc_aligned, chunk_path
from sgl_kvtier.tier.chunk_file import HEADER_SIZE
from sgl_kvtier.tier.tier_dir import QUARANTINE_DIR


def stored(open_store, chunks=3, **settings):
    store = open_store(**settings)
    prompt = make_prompt(chunks)
    prompt.put(store)
    assert store.flush(10)
    return store, prompt


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def o_direct_works(directory):
    try:
        os.close(os.open(directory / "LOCK", os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


def test_round_trip(open_store):
    store, prompt = stored(open_store)
    assert store.contains_prefix(prompt.keys) == 3
    loaded = store.load(prompt.keys, prompt.all_chunk_tokens(), LAYOUT)
    for got, want in zip(loaded, prompt.payloads):
        assert torch.equal(got, want)
    assert LAYOUT.view(loaded[0]).shape == (3, 2, 16, 2, 16)
    s = store.stats()
    assert (s["hits"], s["misses"], s["chunks"], s["chunks_written"]) == (3, 0, 3, 3)
    assert s["bytes_read"] == s["bytes_written"] == 3 * LAYOUT.nbytes


def test_a_read_refused_at_interpreter_exit_is_a_miss_and_unpins(open_store):
    """When the engine dies, Python refuses new thread-pool work: the loader's remaining
    reads must be misses (not one traceback per chunk), and leave no chunk pinned."""
    store, prompt = stored(open_store)
    store._pool.shutdown(wait=True)  # what interpreter exit does to every pool
    futures = store.submit_load(prompt.keys[:2], prompt.all_chunk_tokens()[:2], LAYOUT)
    assert [f.result() for f in futures] == [None, None]
    assert store.stats()["misses"] == 2
    assert set(prompt.keys) <= set(store._index.unpinned_keys())


def test_contains_prefix_stops_at_the_first_gap(open_store):
    store = open_store()
    prompt = make_prompt(4)
    prompt.put(store, [0, 1, 3])
    store.flush(10)
    assert store.contains_prefix(prompt.keys) == 2
    assert store.contains_prefix(prompt.keys[2:]) == 0
    assert store.load(prompt.keys[2:3]) == [None]


@pytest.mark.parametrize("kind", ["aligned", "pinned_helper", "bytearray", "offset_tensor"])
def test_load_into_caller_buffers(open_store, kind):
    store, prompt = stored(open_store)
    n = LAYOUT.nbytes
    if kind == "aligned":
        out = [alloc_aligned(n, pin=False) for _ in prompt.keys]
    elif kind == "pinned_helper":
        out = [alloc_aligned(n) for _ in prompt.keys]  # pinned only where CUDA exists
    elif kind == "bytearray":
        out = [bytearray(n + 100) for _ in prompt.keys]
    else:  # deliberately misaligned views into one staging tensor
        staging = torch.zeros(len(prompt.keys) * n + 3, dtype=torch.uint8)
        out = [staging[3 + i * n:3 + (i + 1) * n] for i in range(len(prompt.keys))]
    loaded = store.load(prompt.keys, out=out)
    for i, (got, want) in enumerate(zip(loaded, prompt.payloads)):
        assert torch.equal(got, want)
        if isinstance(out[i], torch.Tensor):
            assert got.data_ptr() == out[i].data_ptr()  # read in place, no copy handed back
        else:
            assert bytes(out[i][:n]) == want.numpy().tobytes()


def test_too_small_destination_raises(open_store):
    store, prompt = stored(open_store, chunks=1)
    with pytest.raises(ValueError):
        store.load(prompt.keys, out=[bytearray(100)])


def test_flipped_payload_byte_is_a_miss_quarantined_counted_and_logged_once(open_store,
                                                                           tier_log):
    store, prompt = stored(open_store)
    for key in prompt.keys[:2]:
        flip_byte(chunk_path(store.root, key), HEADER_SIZE + 5000)
    assert store.load(prompt.keys)[:2] == [None, None]
    assert not chunk_path(store.root, prompt.keys[0]).exists()
    assert len(os.listdir(store.root / QUARANTINE_DIR)) == 2
    s = store.stats()
    assert (s["checksum_failures"], s["quarantined"], s["misses"], s["hits"]) == (2, 2, 2, 1)
    assert store.contains_prefix(prompt.keys) == 0
    assert len([m for m in tier_warnings(tier_log) if "quarantined" in m]) == 1


def test_flipped_header_byte_is_a_miss_and_quarantined(open_store):
    store, prompt = stored(open_store, chunks=1)
    flip_byte(chunk_path(store.root, prompt.keys[0]), 100)
    assert store.load(prompt.keys) == [None]
    s = store.stats()
    assert (s["corrupt_files"], s["quarantined"], s["checksum_failures"]) == (1, 1, 0)


def test_truncated_file_is_a_miss(open_store):
    store, prompt = stored(open_store, chunks=1)
    path = chunk_path(store.root, prompt.keys[0])
    os.truncate(path, path.stat().st_size - 4096)
    assert store.load(prompt.keys) == [None]
    assert store.stats()["corrupt_files"] == 1


def test_file_deleted_behind_our_back_is_a_miss(open_store):
    store, prompt = stored(open_store, chunks=2)
    chunk_path(store.root, prompt.keys[0]).unlink()
    assert store.load(prompt.keys)[0] is None
    assert store.contains_prefix(prompt.keys) == 0
    assert store.stats()["missing_files"] == 1


def test_other_tokens_or_layout_is_a_miss_but_kept(open_store, tier_log):
    store, prompt = stored(open_store, chunks=1)
    assert store.load(prompt.keys, [prompt.chunk_tokens(0) + 1]) == [None]
    assert store.load(prompt.keys, layout=FP.chunk_layout(32)) == [None]
    assert store.stats()["mismatches"] == 2 and store.contains_prefix(prompt.keys) == 1
    assert store.load(prompt.keys, [prompt.chunk_tokens(0)], LAYOUT)[0] is not None
    assert len(tier_warnings(tier_log)) == 1


def test_a_file_under_another_keys_name_is_never_returned(open_store):
    store, prompt = stored(open_store, chunks=2)
    a, b = (chunk_path(store.root, k) for k in prompt.keys)
    os.replace(a, b)  # b's name now holds a's chunk
    store.close()
    store = open_store()
    assert store.contains_prefix(prompt.keys[1:]) == 0
    assert store.stats()["corrupt_files"] == 1


def test_restart_finds_everything(open_store):
    store, prompt = stored(open_store, chunks=5)
    store.close()
    store = open_store()
    assert store.contains_prefix(prompt.keys) == 5
    assert store.stats()["rebuild_files"] == 5
    for got, want in zip(store.load(prompt.keys), prompt.payloads):
        assert torch.equal(got, want)


def test_rebuild_deletes_temp_files_and_quarantines_bad_ones(open_store):
    store, prompt = stored(open_store, chunks=3)
    store.close()
    good, short, bad = (chunk_path(store.root, k) for k in prompt.keys)
    tmp = good.with_name(f".{good.stem}.999999999.abcd.tmp")  # a writer that is gone
    tmp.write_bytes(good.read_bytes()[:5000])  # a write cut short by a crash
    os.truncate(short, short.stat().st_size - 1)
    flip_byte(bad, 30)
    store = open_store()
    assert not tmp.exists()
    assert store.contains_prefix(prompt.keys) == 1
    assert len(os.listdir(store.root / QUARANTINE_DIR)) == 2
    s = store.stats()
    assert (s["corrupt_files"], s["chunks"]) == (2, 1)


def test_directories_0700_and_files_0600(open_store):
    store, prompt = stored(open_store, chunks=2)
    store.load(prompt.keys, [prompt.chunk_tokens(1)] * 2)  # nothing but a mismatch
    flip_byte(chunk_path(store.root, prompt.keys[0]), HEADER_SIZE)
    store.load(prompt.keys[:1])  # creates quarantine/
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_put_validates_its_arguments(open_store):
    store = open_store()
    prompt = make_prompt(1)
    with pytest.raises(ValueError):
        store.put("not-a-key", prompt.chunk_tokens(0), prompt.payloads[0], LAYOUT)
    with pytest.raises(ValueError):
        store.put(prompt.keys[0], prompt.chunk_tokens(0), prompt.payloads[0][:-1], LAYOUT)
    with pytest.raises(ValueError):
        store.put(prompt.keys[0], prompt.chunk_tokens(0)[:-1], prompt.payloads[0], LAYOUT)


def test_typed_payload_round_trips(open_store):
    store = open_store()
    prompt = make_prompt(1)
    kv = torch.randn(LAYOUT.shape, dtype=LAYOUT.torch_dtype)
    store.put(prompt.keys[0], prompt.chunk_tokens(0), kv, LAYOUT)
    store.flush(10)
    assert torch.equal(LAYOUT.view(store.load(prompt.keys)[0]), kv)


def test_short_garbage_file_is_quarantined_and_o_direct_stays_on(open_store):
    store, prompt = stored(open_store, chunks=1)
    store.close()
    garbage = chunk_path(store.root, "ab" * 32)
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(b"x" * 100)
    store = open_store()
    s = store.stats()
    assert (s["corrupt_files"], s["chunks"]) == (1, 1)
    assert s["direct_io"] == o_direct_works(store.root)  # an odd-sized file is no reason
    assert store.load(prompt.keys)[0] is not None
