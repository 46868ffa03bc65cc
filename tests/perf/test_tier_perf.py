"""The NVMe tier against its references, timed in one process: the store's reads against
plain parallel O_DIRECT reads of the same files, restoring a prompt's KV from disk against
recomputing it with the model (SmolLM2-135M, float32, this CPU), and a prefill with and
without a write-through behind it."""

import time

import pytest
import torch
from timing import gate, interleaved_ratio, interleaved_seconds, one_thread

from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.tier_bench import bare_pass, fill
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig
from sgl_kvtier.tier.direct_io import alloc_aligned
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import TierService

# SmolLM2-135M's KV: 30 layers, 3 KV heads, head_dim 64.
LAYERS, HEADS, DIM = 30, 3, 64


def test_store_reads_near_plain_parallel_reads(benchmark, tmp_path):
    """The store's own cost on reads (header, size and checksum checks, trust checks,
    bookkeeping) against plain parallel O_DIRECT reads of the very same files into the same
    buffers, alternating: the disk's large round-to-round variance hits both alike. (Store
    against a raw sequential read of the disk: README, ``sgl_kvtier.harness.tier_bench``.)"""
    # Store read time over plain read time; measured 0.89-1.14. Against a raw sequential
    # read of the disk instead, the ratio moved from 0.73 to 2.07 between runs here.
    MAX_RATIO = 1.6
    fp = ModelFingerprint("bench", "bfloat16", LAYERS, HEADS, DIM)
    config = StoreConfig(tmp_path / "data", 1 << 40, admission="always")
    keys, _ = fill(tmp_path / "data", fp, 256, 48)  # 283 MB in 5.9 MB chunks
    staging = [alloc_aligned(fp.chunk_layout(256).nbytes) for _ in keys]
    with ChunkStore(config) as store:
        total = len(keys) * store.load(keys[:1], out=staging[:1])[0].numel()

        def store_read() -> float:
            start = time.perf_counter()
            assert all(x is not None for x in store.load(keys, out=staging))
            return time.perf_counter() - start

        def plain_read() -> float:
            return total / bare_pass(store.root, staging, config.read_threads)

        measured = interleaved_seconds(store_read, plain_read, rounds=6, warmup=1)
        benchmark.pedantic(store_read, rounds=3)
    gate(benchmark, "tier store read time / plain parallel O_DIRECT read, 283 MB", measured,
         MAX_RATIO)


@pytest.mark.usefixtures("one_thread")
def test_restore_from_disk_against_recompute(benchmark, tmp_path):
    """1024 prompt tokens: load their KV from the tier into a KV pool, or compute it."""
    MAX_RATIO = 0.03  # measured 0.007-0.017 on 2 AMD EPYC cores, 0.013-0.020 on 2 Xeon cores
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
