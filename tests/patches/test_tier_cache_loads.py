"""Disk hits loaded in the background (``admit_now``), on SGLang's real pools and tree."""

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from tier_cache_harness import CHUNK, admit, build, request, store_chunks

PREFIX = 25 * CHUNK  # on the device
TOKENS = list(range(5000, 5000 + 28 * CHUNK + 1))  # 3 more chunks on disk, then one token


def device_prefix(cache, tokens) -> int:
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(token_ids=list(tokens)))
                              ).device_prefix_len


def cache_with_device_prefix(tmp_path):
    cache = build(tmp_path)
    store_chunks(cache, TOKENS, 28)
    allocator = cache.token_to_kv_pool_allocator
    slots = allocator.alloc(PREFIX)
    cache.insert(InsertParams(key=RadixKey(token_ids=TOKENS[:PREFIX]), value=slots))
    return cache


def test_a_hit_loads_then_joins_the_tree_under_its_device_prefix(tmp_path):
    cache = cache_with_device_prefix(tmp_path)
    req = request(TOKENS)
    rounds = admit(cache, req)
    assert req.prefix_len == 28 * CHUNK and cache.loads_pending() == []
    assert req.storage_hit_length == 3 * CHUNK and req.storage_hit_start == PREFIX
    assert rounds >= 1  # it waited at least one round for its load
    assert cache.evictable_size() == 28 * CHUNK and cache.protected_size() == 0


def test_making_room_for_a_hit_never_evicts_the_prefix_it_continues(tmp_path):
    """Regression: the room for the hit was made before its device prefix was locked, so
    the eviction could take that very prefix; locking it afterwards drove the evictable
    size negative (-768 in a 16-request server test) and the server ran out of memory."""
    cache = cache_with_device_prefix(tmp_path)
    allocator = cache.token_to_kv_pool_allocator
    held = allocator.alloc(allocator.available_size() - 20)  # less free than the hit needs
    assert held is not None and cache.evictable_size() == PREFIX  # the prefix: only victim
    total = accounted(cache) + len(held)
    req = request(TOKENS)
    admit(cache, req)
    # Every slot is either free or in the tree, never both (the bug re-inserted the evicted
    # prefix with its freed slots), and the prefix is still the one it was.
    assert accounted(cache) + len(held) == total
    assert device_prefix(cache, TOKENS) >= PREFIX and req.prefix_len >= PREFIX
    assert cache.evictable_size() >= PREFIX and cache.protected_size() == 0
    allocator.free(held)


def accounted(cache) -> int:
    return (cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size()
            + cache.protected_size())


def test_a_hit_that_fails_its_checksum_is_recomputed_and_its_slots_come_back(tmp_path):
    cache = cache_with_device_prefix(tmp_path)
    for path in cache.tier.store.root.rglob("*.kvc"):  # flip a byte of every payload
        data = bytearray(path.read_bytes())
        data[-10] ^= 0x01
        path.write_bytes(bytes(data))
    free = cache.token_to_kv_pool_allocator.available_size()
    req = request(TOKENS)
    admit(cache, req)
    assert req.prefix_len == PREFIX and req.host_hit_length == 0  # recompute the rest
    assert cache.token_to_kv_pool_allocator.available_size() == free
    assert cache.tier.stats()["load_failures"] == 1 and torch.is_tensor(req.last_node.value)
