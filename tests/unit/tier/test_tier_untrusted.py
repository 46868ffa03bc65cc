"""Nothing on disk is trusted: planted symlinks, FIFOs, devices, other users' files and
headers that lie. The store never touches a path outside its folder, never blocks on a
planted entry, and never serves bytes it cannot prove.

Ownership tests need to create files of another user: CI runs as root, where ``chown``
works; elsewhere those tests are skipped (and say so).
"""

import hashlib
import os
import stat
import threading

import pytest
import torch
from tier_helpers import LAYOUT, make_prompt, tier_warnings

from sgl_kvtier.tier import ChunkStore, StoreConfig, UntrustedRoot, chunk_path
from sgl_kvtier.tier.chunk_file import HEADER_SIZE, ChunkHeader, file_size, pack_header
from sgl_kvtier.tier.layout import ChunkLayout
from sgl_kvtier.tier.tier_dir import QUARANTINE_DIR

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="creating another user's files needs root "
                                                 "(CI runs as root)")
NOBODY = 65534
CHUNK_FILE = file_size(LAYOUT.nbytes)


def snapshot(folder) -> dict:
    """Every entry under ``folder`` with its content digest: what 'untouched' means."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = (hashlib.sha256(open(path, "rb").read()).hexdigest()
                      if stat.S_ISREG(st.st_mode) else None)
            out[os.path.relpath(path, folder)] = (stat.S_IFMT(st.st_mode), digest)
    return out


@pytest.fixture
def outside(tmp_path):
    """A folder beside the tier with 40 files that nothing may create, delete or move."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for i in range(40):
        (folder / f"file-{i}").write_text(f"precious {i}")
    return folder


def stored(open_store, chunks=3, seed=0):
    store = open_store()
    prompt = make_prompt(chunks, seed=seed)
    prompt.put(store)
    assert store.flush(10)
    return store, prompt


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ lying headers


def plant_header(path, key: str, layout: ChunkLayout, payload_len: int, size: int) -> None:
    header = pack_header(ChunkHeader(bytes.fromhex(key), bytes(32), layout, payload_len,
                                     bytes(16)))
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)  # sparse: claims the size without occupying it


@pytest.mark.parametrize("lie", ["length_not_layout", "terabyte_layout"])
def test_a_header_claiming_a_terabyte_is_corrupt_and_evicts_nothing(open_store, lie):
    store, prompt = stored(open_store, chunks=3)
    store.close()
    key = make_prompt(1, seed=9).keys[0]
    path = chunk_path(store.root, key)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if lie == "length_not_layout":
        plant_header(path, key, LAYOUT, 1 << 40, HEADER_SIZE + (1 << 40))
    else:  # a self-consistent layout of a terabyte
        huge = ChunkLayout(1 << 10, 1 << 10, 1 << 10, "uint8", 1 << 10)
        plant_header(path, key, huge, huge.nbytes, HEADER_SIZE + huge.nbytes)
    store = open_store(capacity_bytes=4 * CHUNK_FILE)
    s = store.stats()
    assert (s["corrupt_files"], s["chunks"], s["evictions"]) == (1, 3, 0)
    assert store.contains_prefix(prompt.keys) == 3
    assert all(x is not None for x in store.load(prompt.keys))


def test_a_lying_header_planted_while_running_is_a_counted_miss(open_store):
    store, _ = stored(open_store, chunks=1)
    key = make_prompt(1, seed=9).keys[0]
    path = chunk_path(store.root, key)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    plant_header(path, key, LAYOUT, 1 << 40, HEADER_SIZE + (1 << 40))
    assert store.contains_prefix([key]) == 1  # found on disk (as another server's chunk)
    assert store.load([key]) == [None]  # no exception, nothing allocated for it
    s = store.stats()
    assert (s["corrupt_files"], s["quarantined"]) == (1, 1) and not path.exists()


# ------------------------------------------------------------------------ symlinks


def test_a_symlinked_quarantine_deletes_nothing_outside(open_store, outside):
    store, prompt = stored(open_store, chunks=3)
    before = snapshot(outside)
    (store.root / QUARANTINE_DIR).symlink_to(outside)
    for key in prompt.keys:  # three corrupt chunks, each quarantined and trimmed
        flip_byte(chunk_path(store.root, key), HEADER_SIZE + 10)
    assert store.load(prompt.keys) == [None] * 3
    assert snapshot(outside) == before
    assert store.stats()["checksum_failures"] == 3
    assert not any(chunk_path(store.root, k).exists() for k in prompt.keys)


def test_a_symlinked_shard_folder_never_receives_writes(open_store, outside, tier_log):
    store = open_store()
    prompt = make_prompt(1, seed=3)
    before = snapshot(outside)
    (store.root / prompt.keys[0][:2]).symlink_to(outside)
    prompt.put(store)
    assert store.flush(10)
    assert snapshot(outside) == before
    assert store.stats()["chunks_written"] == 0 and store.stats()["write_errors"] == 1
    store.close()
    reopened = open_store()  # the scan removes the planted link itself, not its target
    assert not (store.root / prompt.keys[0][:2]).is_symlink()
    assert snapshot(outside) == before and reopened.stats()["untrusted_files"] == 1


def test_a_symlinked_chunk_is_never_read_or_followed(open_store, outside):
    store, prompt = stored(open_store, chunks=2)
    real = chunk_path(store.root, prompt.keys[1])
    target = outside / "a-real-chunk"
    target.write_bytes(real.read_bytes())  # a valid chunk, but reached through a link
    real.unlink()
    real.symlink_to(target)
    before = snapshot(outside)
    got = store.load(prompt.keys)
    assert got[0] is not None and got[1] is None
    assert store.stats()["untrusted_files"] == 1
    store.close()
    open_store()  # the scan removes the link, leaves the target
    assert snapshot(outside) == before and not real.is_symlink()


def test_a_symlink_as_the_tier_folder_is_refused(tmp_path, outside):
    (tmp_path / "tier").symlink_to(outside)
    with pytest.raises(UntrustedRoot, match="symlink"):
        ChunkStore(StoreConfig(tmp_path / "tier", 1 << 30))


# --------------------------------------------------------------- owners and modes


@needs_root
def test_a_folder_of_another_user_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o777)
    os.chmod(parent, 0o777)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(UntrustedRoot, match=f"uid {NOBODY}"):
        ChunkStore(StoreConfig(parent / "tp0-of-1", 1 << 30))
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(UntrustedRoot, match=f"uid {NOBODY}"):
        ChunkStore(StoreConfig(root, 1 << 30))


def test_a_loose_mode_of_our_own_folder_is_fixed(tmp_path, tier_log):
    parent = tmp_path / "loose"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with ChunkStore(StoreConfig(parent / "tier", 1 << 30)) as store:
        assert stat.S_IMODE(parent.stat().st_mode) == 0o755
        assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert sum("writable by group or others" in m for m in tier_warnings(tier_log)) == 1


@pytest.mark.parametrize("owner", [pytest.param("other_user", marks=needs_root),
                                   "writable_by_others"])
def test_planted_files_are_skipped_and_counted(open_store, owner):
    store, prompt = stored(open_store, chunks=2)
    store.close()
    victim = chunk_path(store.root, prompt.keys[1])
    os.chmod(victim, 0o666)
    if owner == "other_user":
        os.chmod(victim, 0o600)
        os.chown(victim, NOBODY, NOBODY)
    store = open_store()
    assert store.contains_prefix(prompt.keys) == 1
    assert store.stats()["untrusted_files"] == 1
    assert victim.exists()  # not ours to delete


# ------------------------------------------------------------- FIFOs and devices


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", pytest.param("device", marks=needs_root)])
def test_a_fifo_or_device_under_a_chunk_name_never_blocks(open_store, kind):
    store, prompt = stored(open_store, chunks=2)
    path = chunk_path(store.root, prompt.keys[1])
    path.unlink()

    def plant():
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        else:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # like /dev/zero

    plant()
    result = []
    worker = threading.Thread(target=lambda: result.append(store.load(prompt.keys)))
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "a load blocked on a planted entry"
    assert result[0][0] is not None and result[0][1] is None
    store.close()
    worker = threading.Thread(target=lambda: result.append(open_store()))
    worker.start()  # the start-up scan must not block either
    worker.join(10)
    assert not worker.is_alive(), "the start-up scan blocked on a planted entry"
    assert result[1].stats()["untrusted_files"] == 1 and not path.exists()


def test_a_real_payload_round_trips_through_all_the_checks(open_store):
    store, prompt = stored(open_store, chunks=2)
    for got, want in zip(store.load(prompt.keys), prompt.payloads):
        assert torch.equal(got, want)
