"""The tier as a prefix cache uses it, on a plain-tensor KV pool: find, load, write-through."""

import time

import pytest
import torch

from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig
from sgl_kvtier.tier.kv_transfer import KVPool, pack_chunk, unpack_chunk
from sgl_kvtier.tier.service import TierService, namespace_of

FP = ModelFingerprint("m", "float32", num_layers=2, num_kv_heads=2, head_dim=8)
C = 16  # tokens per chunk
SLOTS = 1024


def make_pool(seed: int) -> KVPool:
    g = torch.Generator().manual_seed(seed)
    return KVPool([torch.randn(SLOTS, 2, 8, generator=g) for _ in range(2)],
                  [torch.randn(SLOTS, 2, 8, generator=g) for _ in range(2)])


def kv_at(pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack((k[slots], v[slots])) for k, v in zip(pool.k, pool.v)])


@pytest.fixture
def service_pair(tmp_path):
    """A writer service on pool A and a reader service on pool B over one directory,
    opened one after the other like a server and its restart."""
    made = []

    def open_service(pool: KVPool, **store_options) -> TierService:
        for s in made:
            s.close()
        store = ChunkStore(StoreConfig(root=tmp_path / "tier", capacity_bytes=1 << 30,
                                       admission="always", **store_options))
        made.append(TierService(store, FP, C, pool, loads_in_flight=3))
        return made[-1]

    yield open_service
    made[-1].close()


def write_through(service: TierService, tokens: torch.Tensor, slots: torch.Tensor,
                  namespace: str = "") -> None:
    service.offer(namespace, tokens, slots, 0, handle="h")
    deadline = time.monotonic() + 30
    while "h" not in service.drain_written():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert service.store.flush(30)


@pytest.mark.parametrize("contiguous", [True, False])
def test_pack_then_unpack_moves_exactly_the_slots(contiguous):
    src, dst = make_pool(0), make_pool(1)
    layout = FP.chunk_layout(C)
    slots = torch.arange(100, 100 + C) if contiguous else torch.randperm(SLOTS)[:C]
    payload = pack_chunk(src, slots, torch.empty(layout.nbytes, dtype=torch.uint8), layout)
    target = torch.arange(500, 500 + C - 3) if contiguous else torch.randperm(SLOTS)[:C - 3]
    before = kv_at(dst, torch.arange(SLOTS))
    unpack_chunk(payload, layout, dst, target, first_token=3)
    assert torch.equal(kv_at(dst, target), kv_at(src, slots[3:]))
    untouched = torch.ones(SLOTS, dtype=torch.bool)
    untouched[target] = False
    assert torch.equal(kv_at(dst, torch.arange(SLOTS))[:, :, untouched], before[:, :, untouched])


def test_restart_finds_and_loads_what_was_written(service_pair):
    tokens = torch.randint(0, 50_000, (5 * C + 7,))  # 5 whole chunks and a tail
    src = make_pool(0)
    src_slots = torch.randperm(SLOTS)[:len(tokens)]
    write_through(service_pair(src), tokens, src_slots)

    dst = make_pool(1)
    service = service_pair(dst)
    # 20 tokens already on the device; SGLang lets at most len - 1 be reused.
    hit = service.find("", tokens, device_len=20, limit=len(tokens) - 1)
    assert (hit.device_len, hit.end, hit.first_chunk, len(hit.keys)) == (20, 5 * C, 1, 4)
    slots = torch.arange(300, 300 + hit.length)
    assert service.load(hit, slots)
    assert torch.equal(kv_at(dst, slots), kv_at(src, src_slots[20:5 * C]))
    # Chunk 4 is keyed by all its 16 tokens: a prompt holding 5 of them cannot use it.
    part = service.find("", tokens[:4 * C + 5], device_len=0, limit=4 * C + 4)
    assert part.end == 4 * C
    # A limit inside a stored chunk uses that chunk in part.
    cut = service.find("", tokens, device_len=C, limit=3 * C + 5)
    assert (cut.end, len(cut.keys)) == (3 * C + 5, 3)
    assert service.stats()["loaded_tokens"] == hit.length


def test_namespaces_and_fingerprints_never_share_chunks(service_pair, tmp_path):
    tokens = torch.randint(0, 50_000, (3 * C,))
    src = make_pool(0)
    write_through(service_pair(src), tokens, torch.arange(3 * C), namespace_of(None, "alice"))
    service = service_pair(make_pool(1))
    assert service.find(namespace_of(None, "bob"), tokens, 0) is None
    assert service.find("", tokens, 0) is None
    assert service.find(namespace_of(None, "alice"), tokens, 0).length == 3 * C
    assert namespace_of(None, None) == "" and namespace_of("lora1", None) != ""


def test_a_corrupt_chunk_fails_the_whole_load(service_pair):
    tokens = torch.randint(0, 50_000, (4 * C,))
    write_through(service_pair(make_pool(0)), tokens, torch.arange(4 * C))
    service = service_pair(make_pool(1))
    hit = service.find("", tokens, 0)
    victim = next(p for p in service.store.root.rglob("*.kvc") if p.stem == hit.keys[2])
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x40
    victim.write_bytes(bytes(data))
    assert not service.load(hit, torch.arange(500, 500 + hit.length))
    stats = service.stats()
    assert stats["load_failures"] == 1 and stats["checksum_failures"] == 1
    assert service.find("", tokens, 0).length == 2 * C  # the prefix before it still serves


def test_offer_skips_what_is_stored_and_reports_progress(service_pair):
    tokens = torch.randint(0, 50_000, (3 * C + 2,))
    service = service_pair(make_pool(0))
    assert service.offer("", tokens[:C + 3], torch.arange(C + 3), 0, "a") == 1
    assert service.offer("", tokens, torch.arange(len(tokens)), 1, "b") == 3
    done = set()
    deadline = time.monotonic() + 30
    while done != {"a", "b"} and time.monotonic() < deadline:
        done |= set(service.drain_written())
    assert service.store.flush(30) and service.stats()["chunks"] == 3
    assert service.offer("", tokens, torch.arange(len(tokens)), 0, "c") == 3  # all stored
    assert service.drain_written() == ["c"] and service.stats()["packed_chunks"] == 3


def test_namespaces_are_unambiguous():
    # With a separator join, ("a\x1fb", None) and ("a", "b\x1f") gave one namespace.
    pairs = [("a\x1fb", None), ("a", "b\x1f"), ("a\x1f", "b"), ("a", "\x1fb"), ("", None),
             (None, ""), ("", ""), ("1:a", None), ("a", None), (None, "a"), ("ab", "c"),
             ("a", "bc"), ("-", None), (None, None)]
    names = [namespace_of(extra, salt) for extra, salt in pairs]
    assert len(set(names)) == len(pairs), dict(zip(names, pairs))


def test_cancelled_copies_never_read_freed_slots(service_pair, monkeypatch):
    """A cache reset frees pinned slots; a copy still queued must not read them after."""
    from sgl_kvtier.tier import faults

    pool = make_pool(0)
    service = service_pair(pool)
    tokens = torch.randint(0, 50_000, (2 * C,))
    monkeypatch.setattr(faults, "_FAULTS", {"copy": ("delay", 0.5)})  # hold the window open
    service.offer("", tokens, torch.arange(2 * C), 0, handle="first")
    assert service.stats()["copies_pending"] == 1
    assert service.cancel_copies() == 1  # the engine's reset, before it frees the slots
    for k, v in zip(pool.k, pool.v):  # another request's KV lands in the freed slots
        k[:2 * C], v[:2 * C] = 7.0, 7.0
    deadline = time.monotonic() + 10
    while "first" not in service.drain_written():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert service.store.flush(10)
    s = service.stats()
    assert (s["copies_cancelled"], s["packed_chunks"], s["chunks_written"]) == (1, 0, 0)
    assert service.find("", tokens, 0) is None
    # Without a reset the same delayed copy is written, so the delay alone prevents nothing.
    service.offer("", tokens, torch.arange(2 * C), 0, handle="second")
    while "second" not in service.drain_written():
        time.sleep(0.01)
    assert service.store.flush(10) and service.find("", tokens, 0).length == 2 * C


def test_a_copy_thread_bug_is_reported_once_and_the_handle_comes_back(service_pair,
                                                                       monkeypatch):
    from sgl_kvtier.tier import faults

    service = service_pair(make_pool(0))
    monkeypatch.setattr(faults, "_FAULTS", {"copy": ("raise", 0.0)})
    for handle in ("a", "b"):
        service.offer("", torch.randint(0, 50_000, (C,)), torch.arange(C), 0, handle)
    deadline = time.monotonic() + 10
    done = []
    while len(done) < 2:
        assert time.monotonic() < deadline
        done += service.drain_written()
        time.sleep(0.01)
    assert sorted(done) == ["a", "b"]
    assert isinstance(service.broken(), faults.InjectedFault)


def throttled_hit(service_pair, chunks: int, chunks_per_s: float):
    """A ``chunks``-chunk prompt written by one service, found by a second one whose reads
    are throttled to about ``chunks_per_s`` chunks a second."""
    tokens = torch.randint(0, 50_000, (chunks * C,))
    src, src_slots = make_pool(0), torch.randperm(SLOTS)[:chunks * C]
    write_through(service_pair(src), tokens, src_slots)
    chunk_bytes = FP.chunk_layout(C).nbytes
    dst = make_pool(1)
    service = service_pair(dst, read_bandwidth_limit=int(chunk_bytes * chunks_per_s))
    hit = service.find("", tokens, 0)
    assert hit.length == chunks * C
    return service, hit, src, src_slots, dst


def wait_until(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_load_runs_in_the_background_and_shows_its_progress(service_pair):
    service, hit, src, src_slots, dst = throttled_hit(service_pair, 8, chunks_per_s=16)
    slots = torch.arange(200, 200 + hit.length)
    job = service.submit_load(hit, slots)
    assert not job.done() and job.chunks_done < job.chunks  # returned before the reads
    seen = set()
    while not job.done():
        seen.add(job.chunks_done)
        time.sleep(0.005)
    assert job.ok and job.wait() and len(seen) >= 3  # progress moved chunk by chunk
    assert torch.equal(kv_at(dst, slots), kv_at(src, src_slots))
    assert service.stats()["loaded_tokens"] == hit.length


def test_back_to_front_lands_the_last_chunk_first(service_pair):
    service, hit, src, src_slots, dst = throttled_hit(service_pair, 8, chunks_per_s=16)
    slots = torch.arange(200, 200 + hit.length)
    before = kv_at(dst, slots)
    job = service.submit_load(hit, slots, order="back")
    wait_until(lambda: job.chunks_done >= 2)
    now = kv_at(dst, slots)
    assert torch.equal(now[:, :, -2 * C:], kv_at(src, src_slots[-2 * C:]))
    assert torch.equal(now[:, :, :C], before[:, :, :C])  # the first chunk is not in yet
    assert job.wait() and torch.equal(kv_at(dst, slots), kv_at(src, src_slots))


def test_a_cancelled_load_stops_between_chunks(service_pair):
    service, hit, src, src_slots, dst = throttled_hit(service_pair, 12, chunks_per_s=16)
    slots = torch.arange(200, 200 + hit.length)
    job = service.submit_load(hit, slots)
    wait_until(lambda: job.chunks_done >= 2)
    job.cancel()
    assert not job.wait(30) and job.done() and job.cancelled
    assert job.chunks_done < job.chunks  # it stopped early
    stats = service.stats()
    assert stats["loads_cancelled"] == 1 and stats["load_failures"] == 0
    assert stats["loaded_tokens"] == 0


def test_a_picked_load_reads_what_it_is_asked_and_survives_a_bad_chunk(service_pair):
    """Bidirectional prefill's mode: the caller picks each chunk, a corrupt one is reported
    (the caller computes it) without ending the job, and nothing is counted for it."""
    service, hit, src, src_slots, dst = throttled_hit(service_pair, 6, chunks_per_s=200)
    victim = next(p for p in service.store.root.rglob("*.kvc") if p.stem == hit.keys[3])
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x40
    victim.write_bytes(bytes(data))
    wanted, landed = [5, 3, 1], []
    slots = torch.arange(200, 200 + hit.length)
    before = kv_at(dst, slots)
    job = service.submit_load(hit, slots, pick=lambda: wanted.pop(0) if wanted else None,
                              landed=lambda i, ok, s: landed.append((i, ok, s)))
    assert job.wait(30)  # not cancelled: the job itself succeeded
    assert [(i, ok) for i, ok, _ in landed] == [(5, True), (3, False), (1, True)]
    assert all(s > 0 for _, _, s in landed) and job.chunks_done == 2
    now = kv_at(dst, slots)
    for i in range(6):
        part = slice(i * C, (i + 1) * C)
        expected = kv_at(src, src_slots[part]) if i in (5, 1) else before[:, :, part]
        assert torch.equal(now[:, :, part], expected), i
    stats = service.stats()
    assert stats["loaded_tokens"] == 0 and stats["load_failures"] == 0  # the caller counts
    assert stats["checksum_failures"] == 1
