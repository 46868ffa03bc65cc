"""O_DIRECT and buffered reads agree, the bandwidth cap holds, threads can share a store."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from tier_helpers import LAYOUT, make_prompt, tier_warnings

from sgl_kvtier.tier import TokenBucket, alloc_aligned, measure_read_bandwidth
from sgl_kvtier.tier.direct_io import ALIGN, IOMode


def test_alloc_aligned():
    for n in (1, 4096, 10_000):
        t = alloc_aligned(n, pin=False)
        assert t.shape == (n,) and t.dtype == torch.uint8 and t.data_ptr() % ALIGN == 0


def test_direct_and_buffered_reads_return_the_same_bytes(open_store):
    store = open_store(direct_io=True)
    prompt = make_prompt(4)
    prompt.put(store)
    store.flush(10)
    direct = store.load(prompt.keys)
    store.close()
    buffered_store = open_store(direct_io=False)
    buffered = buffered_store.load(prompt.keys, out=[bytearray(LAYOUT.nbytes), None, None, None])
    assert not buffered_store.stats()["direct_io"]
    for a, b, want in zip(direct, buffered, prompt.payloads):
        assert torch.equal(a, want) and torch.equal(b, want)


def test_einval_from_o_direct_falls_back_to_buffered_once(tmp_path, tier_log):
    data = np.random.default_rng(0).integers(0, 256, 3 * ALIGN, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    mode = IOMode(direct=True)
    if not mode.direct:
        pytest.skip("no O_DIRECT on this platform")
    with mode.open(tmp_path / "f", os.O_RDONLY) as f:
        if not f.direct:
            pytest.skip("this filesystem refused O_DIRECT at open")
        dst = np.empty(ALIGN, np.uint8)
        # An offset O_DIRECT cannot serve: the kernel answers EINVAL, as some filesystems do.
        assert f.read_into(dst, 100) == ALIGN
    assert np.array_equal(dst, data[100:100 + ALIGN])
    if mode.direct:
        pytest.skip("this filesystem does not enforce O_DIRECT alignment (tmpfs)")
    assert not f.direct
    mode.fall_back(tmp_path / "f", OSError(22, "again"))
    assert len(tier_warnings(tier_log)) == 1 and "O_DIRECT" in tier_warnings(tier_log)[0]


def test_bandwidth_probe_measures_and_cleans_up(tmp_path):
    rate = measure_read_bandwidth(tmp_path, size_bytes=8 << 20, block_bytes=1 << 20)
    assert rate > 0 and os.listdir(tmp_path) == []


def test_token_bucket_math():
    now, slept = [0.0], []
    bucket = TokenBucket(rate=1000, burst=100, clock=lambda: now[0], sleep=slept.append)
    assert bucket.acquire(100) == 0  # the burst
    assert bucket.acquire(500) == pytest.approx(0.5)
    assert bucket.acquire(500) == pytest.approx(1.0)  # queued behind the first debt
    now[0] = 10.0  # long idle: refills to the burst, not beyond
    assert bucket.acquire(100) == 0
    assert bucket.acquire(1) == pytest.approx(0.001)
    assert slept == pytest.approx([0.5, 1.0, 0.001])


def test_read_bandwidth_limit_limits(open_store):
    prompt = make_prompt(24)
    fast = open_store()
    prompt.put(fast)
    fast.flush(10)
    start = time.perf_counter()
    fast.load(prompt.keys)
    fast_s = time.perf_counter() - start
    fast.close()
    total = len(prompt.keys) * LAYOUT.nbytes
    limit = total / 0.4  # about 0.4 s of reading at the cap
    slow = open_store(read_bandwidth_limit=limit)
    start = time.perf_counter()
    loaded = slow.load(prompt.keys)
    slow_s = time.perf_counter() - start
    assert all(x is not None for x in loaded)
    burst = 0.05 * limit
    assert slow_s >= (total - burst) / limit * 0.9  # the cap held
    assert slow_s > 2 * fast_s
    assert slow.stats()["read_bandwidth"] < 1.5 * limit


def test_concurrent_puts_and_loads(open_store):
    store = open_store(read_threads=3)
    prompts = [make_prompt(6, seed=s) for s in range(4)]
    errors = []

    def worker(prompt):
        try:
            for _ in range(3):
                prompt.put(store)
                for got, want in zip(store.load(prompt.keys), prompt.payloads):
                    assert got is None or torch.equal(got, want)
        except Exception as e:  # reported below, from the test thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.flush(10)
    for prompt in prompts:
        assert all(torch.equal(g, w) for g, w in zip(store.load(prompt.keys), prompt.payloads))
    s = store.stats()
    assert s["checksum_failures"] == s["corrupt_files"] == s["write_errors"] == 0
    assert s["chunks"] == 24 and s["chunks_written"] == 24
