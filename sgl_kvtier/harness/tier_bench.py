"""Store read bandwidth against the disk's raw O_DIRECT bandwidth, and index rebuild time.

Run ``python -m sgl_kvtier.harness.tier_bench --root DIR`` with DIR on the disk to measure. The raw
probe and the store's reads alternate, so both see the same disk conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sgl_kvtier.tier.chunk_file import HEADER_SIZE
from sgl_kvtier.tier.config import StoreConfig
from sgl_kvtier.tier.direct_io import alloc_aligned
from sgl_kvtier.tier.keys import chunk_keys
from sgl_kvtier.tier.layout import ModelFingerprint
from sgl_kvtier.tier.probe import measure_read_bandwidth
from sgl_kvtier.tier.store import ChunkStore


def fill(root: Path, fp: ModelFingerprint, tokens: int, chunks: int) -> tuple[list[str], float]:
    """Write ``chunks`` random chunks; returns their keys and the write bandwidth."""
    layout = fp.chunk_layout(tokens)
    ids = torch.randint(0, 50_000, (chunks * tokens,))
    keys = chunk_keys(fp, "bench", ids, tokens)
    payload = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)
    with ChunkStore(StoreConfig(root, 1 << 40, admission="always")) as store:
        for i, key in enumerate(keys):
            payload[:8] = torch.tensor(list(i.to_bytes(8, "little")))  # distinct chunks
            store.put(key, ids[i * tokens:(i + 1) * tokens], payload.clone(), layout)
            if i % 16 == 15:
                store.flush()  # stay under the write queue's byte bound
        store.flush()
        stats = store.stats()
        assert stats["chunks_written"] == chunks, stats
        return keys, stats["write_bandwidth"]


def store_pass(root: Path, keys: list[str], staging: list[torch.Tensor] | None,
               **settings: object) -> float:
    """Bytes per second of one ``load`` of every key, by wall clock."""
    with ChunkStore(StoreConfig(root, 1 << 40, admission="always", **settings)) as store:
        start = time.perf_counter()
        loaded = store.load(keys, out=staging)
        seconds = time.perf_counter() - start
        assert all(x is not None for x in loaded), "bench chunks went missing"
        return sum(x.numel() for x in loaded) / seconds


def bare_pass(root: Path, staging: list[torch.Tensor], threads: int) -> float:
    """Bytes per second of plain parallel O_DIRECT reads of the same files, nothing checked."""
    paths = sorted(root.rglob("*.kvc"))

    def read(i: int) -> int:
        fd = os.open(paths[i], os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [staging[i].numpy()], HEADER_SIZE)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(len(paths))))
    return total / (time.perf_counter() - start)


def drop_page_cache(root: Path) -> None:
    """Evict the chunk files from the page cache, so buffered reads hit the disk."""
    for path in root.rglob("*.kvc"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rebuild_seconds(root: Path, files: int, rounds: int) -> list[float]:
    """Seconds to reopen a store of ``files`` chunk files, once per round."""
    fill(root, ModelFingerprint("bench-index", "float16", 1, 1, 64), 16, files)
    seconds = []
    for _ in range(rounds):
        with ChunkStore(StoreConfig(root, 1 << 40, admission="always")) as store:
            assert store.stats()["chunks"] == files
            seconds.append(store.scan.seconds)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="directory on the disk to test")
    parser.add_argument("--total-mib", type=int, default=1024, help="chunk bytes to read")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index-files", type=int, default=2000)
    args = parser.parse_args()
    base = args.root or Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir="/var/tmp"))
    try:
        report(args, base)
    finally:
        if args.root is None:
            shutil.rmtree(base)


def report(args: argparse.Namespace, base: Path) -> None:
    fp = ModelFingerprint("bench", "bfloat16", args.layers, args.kv_heads, args.head_dim)
    layout = fp.chunk_layout(args.tokens)
    chunks = max(1, (args.total_mib << 20) // layout.nbytes)
    keys, write_bw = fill(base / "data", fp, args.tokens, chunks)
    staging = [alloc_aligned(layout.nbytes) for _ in keys]
    raw, bare, into, fresh, buffered = [], [], [], [], []
    for _ in range(args.rounds):
        raw.append(measure_read_bandwidth(base, chunks * layout.nbytes))
        bare.append(bare_pass(base / "data", staging, args.read_threads))
        into.append(store_pass(base / "data", keys, staging, read_threads=args.read_threads))
        fresh.append(store_pass(base / "data", keys, None, read_threads=args.read_threads))
        drop_page_cache(base / "data")
        buffered.append(store_pass(base / "data", keys, staging, direct_io=False,
                                   read_threads=args.read_threads))
    gb = 1e9
    print(json.dumps({
        "chunk_bytes": layout.nbytes, "chunks": chunks, "read_threads": args.read_threads,
        "write_GBps": round(write_bw / gb, 3),
        "raw_odirect_GBps": [round(x / gb, 3) for x in raw],
        "bare_parallel_odirect_GBps": [round(x / gb, 3) for x in bare],
        "store_into_staging_GBps": [round(x / gb, 3) for x in into],
        "store_new_tensors_GBps": [round(x / gb, 3) for x in fresh],
        "store_buffered_GBps": [round(x / gb, 3) for x in buffered],
        "median_store_over_raw": round(statistics.median(into) / statistics.median(raw), 3),
        "median_store_over_bare": round(statistics.median(into) / statistics.median(bare), 3),
        "rebuild_files": args.index_files,
        "rebuild_seconds": [round(x, 3) for x in
                            rebuild_seconds(base / "index", args.index_files, args.rounds)],
    }, indent=1))


if __name__ == "__main__":
    main()
