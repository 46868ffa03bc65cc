"""A ``KVTierRadixCache`` over SGLang's real CPU pools and a real store, without a server.

SmolLM2-like KV shapes, small: enough to drive ``match_prefix`` / ``init_load_back`` /
``reset`` as SGLang's scheduler does, in one process or one process per rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from sgl_kvtier.patches.tier_cache import KVTierRadixCache
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import TierService

LAYERS, HEADS, DIM, CHUNK, SLOTS = 2, 3, 16, 16, 1024


def build(folder: Path, tp_rank: int = 0, tp_size: int = 1, group=None,
          with_tier: bool = True, read_limit: int | None = None,
          prefill=None) -> KVTierRadixCache:
    """A cache whose tier (if any) lives in ``folder``; the KV pool holds random values."""
    kv = MHATokenToKVPool(size=SLOTS, page_size=1, dtype=torch.float32, head_num=HEADS,
                          head_dim=DIM, layer_num=LAYERS, device="cpu",
                          enable_memory_saver=False, enable_alt_stream=False)
    for buf in (*kv.k_buffer, *kv.v_buffer):
        buf.copy_(torch.randn_like(buf))
    allocator = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=SLOTS, device="cpu",
                              enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool,
                             token_to_kv_pool_allocator=allocator, page_size=1,
                             tp_cache_group=group)
    tier = None
    if with_tier:
        fp = ModelFingerprint("harness", "float32", LAYERS, HEADS, DIM, tp_rank=tp_rank,
                              tp_size=tp_size)
        store = ChunkStore(StoreConfig(folder, 1 << 30, admission="always",
                                       read_bandwidth_limit=read_limit))
        tier = TierService(store, fp, CHUNK, KVPool(list(kv.k_buffer), list(kv.v_buffer)))
    return KVTierRadixCache(params, tier, group, prefill=prefill)


def store_chunks(cache: KVTierRadixCache, tokens: list[int], chunks: int) -> None:
    """Write the first ``chunks`` chunks of ``tokens`` to the cache's tier (random KV)."""
    tier = cache.tier
    slots = torch.arange(1, 1 + chunks * CHUNK)
    tier.offer("", tokens[:chunks * CHUNK], slots, 0, "stored")
    while "stored" not in tier.drain_written():
        pass
    assert tier.store.flush(30)


class _Req(SimpleNamespace):
    def init_next_round_input(self, cache: KVTierRadixCache) -> None:
        # What SGLang's Req does each scheduling round: match the tree (and the tier).
        self.host_hit_length, self.last_node = lookup(cache, self)
        self.prefix_len = cache.match_prefix(MatchPrefixParams(key=RadixKey(
            token_ids=list(self.full_untruncated_fill_ids)))).device_prefix_len


def request(tokens: list[int], rid: str = "r"):
    return _Req(rid=rid, full_untruncated_fill_ids=list(tokens))


def admit(cache: KVTierRadixCache, req, max_rounds: int = 4000) -> int:
    """Scheduling rounds as SGLang's adder runs them (match, then ``admit_now``) until the
    request may be admitted; returns how many rounds it waited for its load."""
    for rounds in range(max_rounds):
        req.init_next_round_input(cache)
        if cache.admit_now(req) is True:
            return rounds
        time.sleep(0.002)
    raise AssertionError("the load never finished")


def lookup(cache: KVTierRadixCache, req) -> tuple[int, object]:
    """``match_prefix`` as SGLang calls it; returns (host hit length, best node)."""
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(token_ids=list(
        req.full_untruncated_fill_ids)), req=req))
    return result.host_hit_length, result.last_device_node


def load(cache: KVTierRadixCache, req, host_hit: int, node) -> int:
    """``init_load_back`` as SGLang calls it; returns the tokens loaded."""
    loaded, _ = cache.init_load_back(InitLoadBackParams(best_match_node=node,
                                                        host_hit_length=host_hit, req=req))
    return loaded
