"""The NVMe tier against its references, timed in one process: the store's reads against
a raw sequential O_DIRECT read of the same disk, and restoring a prompt's KV from disk
against recomputing it with the model (SmolLM2-135M, float32, this CPU)."""

import time

import pytest
import torch
from timing import gate, interleaved_ratio, interleaved_seconds, one_thread

from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.tier_bench import fill
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig, measure_read_bandwidth
from sgl_kvtier.tier.direct_io import alloc_aligned
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import TierService

# SmolLM2-135M's KV: 30 layers, 3 KV heads, head_dim 64.
LAYERS, HEADS, DIM = 30, 3, 64


def test_store_reads_near_raw_disk_bandwidth(benchmark, tmp_path):
    """Goal 0.9x the raw bandwidth (README); the gate leaves room for this shared disk."""
    # Store read time over raw read time; measured 0.73-1.24 (the raw rate of this virtual
    # disk moves between 0.9 and 2.1 GB/s from one round to the next).
    MAX_RATIO = 1.8
    fp = ModelFingerprint("bench", "bfloat16", LAYERS, HEADS, DIM)
    layout = fp.chunk_layout(256)
    keys, _ = fill(tmp_path / "data", fp, 256, 48)  # 283 MB in 5.9 MB chunks
    staging = [alloc_aligned(layout.nbytes) for _ in keys]
    total = len(keys) * layout.nbytes
    with ChunkStore(StoreConfig(tmp_path / "data", 1 << 40, admission="always")) as store:
        def store_read() -> float:
            start = time.perf_counter()
            assert all(x is not None for x in store.load(keys, out=staging))
            return time.perf_counter() - start

        def raw_read() -> float:
            # The probe writes a scratch file of the same size, then times its read alone.
            return total / measure_read_bandwidth(tmp_path, total)

        measured = interleaved_seconds(store_read, raw_read, rounds=4)
        benchmark.extra_info["store_over_raw_bandwidth"] = 1 / measured["ratio"]
        benchmark.pedantic(store_read, rounds=3)
    gate(benchmark, "tier store read time / raw O_DIRECT read time, 283 MB", measured,
         MAX_RATIO)


@pytest.mark.usefixtures("one_thread")
def test_restore_from_disk_against_recompute(benchmark, tmp_path):
    """1024 prompt tokens: load their KV from the tier into a KV pool, or compute it."""
    MAX_RATIO = 0.02  # measured 0.007-0.017 on 2 AMD EPYC cores
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path("smollm2"), dtype=torch.float32)
    tokens = torch.randint(0, 49_000, (1024,))
    fp = ModelFingerprint("smollm2", "float32", LAYERS, HEADS, DIM)
    pool = KVPool([torch.randn(4096, HEADS, DIM) for _ in range(LAYERS)],
                  [torch.randn(4096, HEADS, DIM) for _ in range(LAYERS)])
    store = ChunkStore(StoreConfig(tmp_path / "tier", 1 << 40, admission="always"))
    service = TierService(store, fp, 256, pool)
    try:
        service.offer("", tokens, torch.arange(1, 1025), 0, "written")
        while "written" not in service.drain_written():
            time.sleep(0.01)
        assert store.flush(60)

        def restore():
            hit = service.find("", tokens, 0)
            assert hit.length == 1024 and service.load(hit, torch.arange(2048, 3072))

        def recompute():
            with torch.no_grad():
                model(tokens[None], use_cache=True)

        measured = interleaved_ratio(restore, recompute, rounds=3, warmup=1)
        benchmark.pedantic(restore, rounds=5, warmup_rounds=1)
    finally:
        service.close()
    gate(benchmark, "tier restore / model recompute, 1024-token prompt", measured, MAX_RATIO)


def test_write_through_barely_slows_a_concurrent_prefill(benchmark, tmp_path):
    """Writing a 4096-token prompt (189 MB) through to disk behind a 1024-token prefill."""
    # Goal 1.03 (README). Measured 0.94-1.09 with the background threads at nice 19, 1.24 at
    # normal priority; single prefills on this shared machine vary by 10%, hence the bound.
    MAX_RATIO = 1.2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path("smollm2"), dtype=torch.float32)
    fp = ModelFingerprint("smollm2", "float32", LAYERS, HEADS, DIM)
    pool = KVPool([torch.randn(5000, HEADS, DIM) for _ in range(LAYERS)],
                  [torch.randn(5000, HEADS, DIM) for _ in range(LAYERS)])
    store = ChunkStore(StoreConfig(tmp_path / "tier", 1 << 40, admission="always"))
    service = TierService(store, fp, 256, pool)
    prompt = torch.randint(0, 49_000, (1, 1024))
    rounds = iter(range(1000))

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(prompt)
        return time.perf_counter() - start

    def prefill_while_writing() -> float:
        handle = next(rounds)
        service.offer("", torch.randint(0, 49_000, (4096,)), torch.arange(1, 4097), 0, handle)
        seconds = prefill()
        while handle not in service.drain_written():
            time.sleep(0.01)
        assert service.store.flush(120)
        return seconds

    try:
        measured = interleaved_seconds(prefill_while_writing, prefill, rounds=5, warmup=1)
        benchmark.pedantic(prefill, rounds=2)
    finally:
        service.close()
    assert service.stats()["chunks_written"] >= 5 * 16
    gate(benchmark, "prefill while writing through / prefill alone, 1024 tokens", measured,
         MAX_RATIO)
