"""Disk hits loaded in the background (``admit_now``), on SGLang's real pools and tree."""

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from tier_cache_harness import CHUNK, admit, build, load, lookup, request, store_chunks

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


def test_a_load_takes_no_more_than_the_budget_it_was_checked_against(tmp_path):
    """Regression (CI, 16 concurrent requests): ``admit_now`` checked the hit and the extend
    against the adder's budget, then locked the device prefix, which took its 400 tokens
    out of the evictable pool the budget had counted; a request admitted earlier in the
    round then found too few slots and the scheduler died with "Out of memory"."""
    need = 3 * CHUNK + 1 + 256  # the hit, the one token left to compute, the headroom
    for budget, starts in ((need + 100, False), (need + PREFIX, True)):
        cache = cache_with_device_prefix(tmp_path / str(budget))
        assert cache.evictable_size() == PREFIX  # the prefix the hit continues is free
        req = request(TOKENS)
        req.init_next_round_input(cache)
        before = pool_left(cache)
        verdict = cache.admit_now(req, budget)
        assert verdict is (False if starts else None)  # loading, or: does not fit now
        assert before - pool_left(cache) <= budget
        assert (cache.loads_pending() != []) is starts
        if not starts:  # nothing held: the prefix is evictable again, no slot taken
            assert pool_left(cache) == before and cache.protected_size() == 0
        else:
            admit(cache, req)
            assert req.prefix_len == 28 * CHUNK


def test_a_load_inside_sglangs_admission_respects_the_round_budget(tmp_path):
    """``init_load_back`` (``tier.async_load: false``) runs inside SGLang's admission,
    whose budget also holds back the extends of requests admitted earlier in the round:
    free slots alone would let the load take their room."""
    need = 3 * CHUNK + 1 + 256
    for budget, loads in ((need - 1, False), (need, True)):
        cache = cache_with_device_prefix(tmp_path / str(budget))
        req = request(TOKENS)
        host_hit, node = lookup(cache, req)
        assert host_hit == 3 * CHUNK
        cache.load_budget = lambda budget=budget: budget  # what the adder has left
        free = cache.token_to_kv_pool_allocator.available_size()
        assert free > need  # the pool alone would have said yes
        assert load(cache, req, host_hit, node) == (3 * CHUNK if loads else 0)
        taken = free - cache.token_to_kv_pool_allocator.available_size()
        assert taken == (3 * CHUNK if loads else 0)


def pool_left(cache) -> int:
    """Free plus evictable slots: what SGLang's prefill adder counts as its budget."""
    return cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size()


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
