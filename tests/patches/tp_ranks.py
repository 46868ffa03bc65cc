"""One tensor-parallel rank driving ``KVTierRadixCache`` over gloo (spawned by the TP test).

Each scenario builds fresh caches on every rank, makes one rank fail (or differ), then
drives the same scheduler calls on every rank, as SGLang's per-rank schedulers do. A rank
that waited in a collective the others never reached raises after ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from tier_cache_harness import CHUNK, admit, build, load, lookup, request, store_chunks

TIMEOUT = 20
TOKENS = list(range(1000, 1000 + 4 * CHUNK + 1))


def _fail_in(cache, method: str) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected: {method} failed on this rank")
    setattr(cache.tier, method, broken)


def scenario_shortest_hit(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group)
    store_chunks(cache, TOKENS, 4 if rank == 0 else 2)
    req = request(TOKENS)
    hit, node = lookup(cache, req)
    return {"hit": hit, "loaded": load(cache, req, hit, node), "active": cache._active}


def scenario_lookup_error(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group)
    store_chunks(cache, TOKENS, 4)
    if rank == 1:
        _fail_in(cache, "find")
    hit, _ = lookup(cache, request(TOKENS))
    again, _ = lookup(cache, request(TOKENS, "r2"))  # both ranks now skip the collective
    return {"hit": hit, "again": again, "active": cache._active}


def scenario_load_error(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group)
    store_chunks(cache, TOKENS, 4)
    if rank == 0:
        _fail_in(cache, "load")
    free = cache.token_to_kv_pool_allocator.available_size()
    req = request(TOKENS)
    hit, node = lookup(cache, req)
    loaded = load(cache, req, hit, node)
    return {"hit": hit, "loaded": loaded, "active": cache._active,
            "slots_returned": cache.token_to_kv_pool_allocator.available_size() == free}


def scenario_background_error(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group)
    store_chunks(cache, TOKENS, 4)
    if rank == 1:
        _fail_in(cache, "drain_written")
    cache.flush_pending_backups()  # after a batch: local to each rank, no collective
    hit, _ = lookup(cache, request(TOKENS))
    return {"hit": hit, "active": cache._active, "healthy": cache._healthy}


def scenario_open_failure(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group, with_tier=(rank == 0))
    if cache.tier is not None:
        store_chunks(cache, TOKENS, 4)
    hit, _ = lookup(cache, request(TOKENS))
    return {"hit": hit, "active": cache._active}


def scenario_async_uneven_ranks(rank: int, folder: Path, group) -> dict:
    # Rank 1 reads about 20x slower: both must still admit the request in the same round.
    chunk_bytes = 2 * 2 * 3 * 16 * 4 * CHUNK  # layers, k/v, heads, dim, float32, tokens
    cache = build(folder, rank, 2, group, read_limit=None if rank == 0 else chunk_bytes * 20)
    store_chunks(cache, TOKENS, 4)
    req = request(TOKENS)
    rounds = admit(cache, req)
    req.init_next_round_input(cache)
    return {"rounds": rounds, "prefix": req.prefix_len, "active": cache._active,
            "pending": len(cache.loads_pending())}


def scenario_async_load_error(rank: int, folder: Path, group) -> dict:
    cache = build(folder, rank, 2, group)
    store_chunks(cache, TOKENS, 4)
    if rank == 0:
        _fail_in(cache, "submit_load")
    free = cache.token_to_kv_pool_allocator.available_size()
    req = request(TOKENS)
    rounds = admit(cache, req)
    return {"rounds": rounds, "prefix": req.prefix_len, "host_hit": req.host_hit_length,
            "active": cache._active,
            "slots_returned": cache.token_to_kv_pool_allocator.available_size() == free}


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in globals().items()
             if name.startswith("scenario_")}


def main(rank: int, port: int, folder: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=timedelta(seconds=TIMEOUT))
    out = {}
    for name, fn in SCENARIOS.items():
        try:
            out[name] = fn(rank, Path(folder) / name / f"rank{rank}", dist.group.WORLD)
        except Exception:
            out[name] = {"error": traceback.format_exc(limit=3)}
            break  # a rank that failed a collective cannot go on with the group
    results.put((rank, out))
    dist.destroy_process_group()
