"""Bidirectional prefill (``patches/tier_prefill.py``) on SGLang's real pools and tree.

The scheduler's side is played here as SGLang's prefill adder and chunked prefill do it:
each round asks ``compute_budget``, "computes" that many tokens (writes their true KV into
fresh slots, at a set pace) and checkpoints them into the tree; the tier's loader reads the
back meanwhile, throttled. At the end the request's row must hold the true KV of every
token, computed or loaded, and every slot must be accounted for."""

import time
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from tier_cache_harness import CHUNK, LAYERS, build, store_chunks

from sgl_kvtier.config import PrefillConfig

CHUNKS = 28
N = CHUNKS * CHUNK  # on disk: 448 tokens
TOKENS = list(range(9000, 9000 + N + 1))  # then one token to compute
CHUNK_BYTES = LAYERS * 2 * CHUNK * 3 * 16 * 4
RATE = 320.0  # tokens/s, both sides: load all ~1.4 s, compute all ~1.4 s


class Req(SimpleNamespace):
    """The fields of SGLang's Req the tree, the tier and the bidirectional prefill read."""

    def __init__(self, tokens, rid="bidir"):
        super().__init__(
            rid=rid, full_untruncated_fill_ids=list(tokens), origin_input_ids=list(tokens),
            extra_key=None, cache_salt=None, priority=0, lock=None, prefix_len=0,
            extend_end=0, host_hit_length=0, last_node=None,
            sampling_params=SimpleNamespace(custom_params=None),
            kv=SimpleNamespace(req_pool_idx=None, cache_protected_len=0, cache_inserted_len=0,
                               swa_evict_floor=0))

    def init_next_round_input(self, cache) -> None:
        result = cache.match_prefix(MatchPrefixParams(
            key=RadixKey(token_ids=list(self.full_untruncated_fill_ids)), req=self))
        self.prefix_len, self.last_node = result.device_prefix_len, result.last_device_node
        self.host_hit_length = result.host_hit_length


def kv_of(cache, slots: torch.Tensor) -> torch.Tensor:
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    return torch.stack([torch.stack((pool.k_buffer[i][slots], pool.v_buffer[i][slots]))
                        for i in range(LAYERS)])


def write_kv(cache, slots: torch.Tensor, kv: torch.Tensor) -> None:
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for i in range(LAYERS):
        pool.k_buffer[i][slots], pool.v_buffer[i][slots] = kv[i, 0], kv[i, 1]


def accounted(cache) -> int:
    return (cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size()
            + cache.protected_size())


def setup(tmp_path, corrupt: int | None = None):
    cache = build(tmp_path, read_limit=int(CHUNK_BYTES * RATE / CHUNK),
                  prefill=PrefillConfig(enabled=True, chunk_tokens=64, min_prefix_tokens=64))
    store_chunks(cache, TOKENS, CHUNKS)  # the KV of slots 1..N: the truth
    truth = kv_of(cache, torch.arange(1, 1 + N)).clone()
    if corrupt is not None:
        victim = next(p for p in cache.tier.store.root.rglob("*.kvc")
                      if p.stem == cache.tier.find("", TOKENS, 0).keys[corrupt])
        data = bytearray(victim.read_bytes())
        data[-10] ^= 0x01
        victim.write_bytes(bytes(data))
    return cache, truth


def one_round(cache, req, truth) -> int | None:
    """One scheduling round for ``req``; returns the budget it was given."""
    if req.kv.req_pool_idx is None:
        req.init_next_round_input(cache)
        assert cache.admit_now(req) is True  # admitted at once, its hit still on disk
    cap = cache.compute_budget(req)
    if not cap:
        return cap
    if req.kv.req_pool_idx is None:  # SGLang gives the admitted request its row
        req.kv.req_pool_idx = cache.req_to_token_pool.alloc_rows(1)[0]
        req.kv.cache_protected_len = req.prefix_len
        req.lock = cache.lock(req.last_node)
    start, stop = req.prefix_len, req.prefix_len + cap
    assert stop <= N, "computed into the tokens after the hit"
    slots = cache.token_to_kv_pool_allocator.alloc(cap)
    write_kv(cache, slots, truth[:, :, start:stop])  # the "model" computes the true KV
    time.sleep(cap / RATE)
    cache.req_to_token_pool.write((req.kv.req_pool_idx, slice(start, stop)), slots)
    req.extend_end = stop  # then the scheduler's stash: checkpoint, prefix moves on
    cache.checkpoint(req, up_to=stop)
    req.prefix_len = stop
    return cap


def prefill(cache, req, truth, max_rounds: int = 5000) -> list:
    caps = []
    for _ in range(max_rounds):
        cap = one_round(cache, req, truth)
        caps.append(cap)
        if cap is None:
            return caps
        if cap == 0:
            time.sleep(0.002)
    raise AssertionError(f"the prefix never completed: {caps[-10:]}")


def finish(cache, req) -> None:
    cache.bidir.free_retired(wait=True)
    cache.unlock(req.lock)
    deadline = time.monotonic() + 30
    while cache.protected_size() and time.monotonic() < deadline:
        cache.flush_pending_backups()  # write-through copies done: nodes unpinned
        time.sleep(0.01)


def test_front_computed_back_loaded_and_the_row_holds_the_true_kv(tmp_path):
    cache, truth = setup(tmp_path)
    before = accounted(cache)
    req = Req(TOKENS)
    caps = prefill(cache, req, truth)
    assert req.prefix_len == N  # the whole hit is present: only the last token is computed
    row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :N].to(torch.int64)
    assert torch.equal(kv_of(cache, row), truth)
    report = cache.tier_state()["prefill"]["recent"][-1]
    assert 0 < report["split"] < N, report  # both sides produced part of it
    assert report["computed_tokens"] == report["split"]
    assert report["computed_tokens"] + report["loaded_tokens"] == N
    assert max(c for c in caps if c) <= 64  # never more than a compute chunk per round
    # The tree holds the whole prefix, with the loaded slots behind the computed ones.
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(token_ids=TOKENS)))
    assert match.device_prefix_len == N
    finish(cache, req)
    assert accounted(cache) == before and cache.loads_pending() == []
    assert cache.tier_state()["prefill"]["active"] == 0


def test_a_chunk_that_fails_its_checksum_is_computed_never_served(tmp_path):
    cache, truth = setup(tmp_path, corrupt=CHUNKS - 1)  # the first chunk the loader reads
    req = Req(TOKENS)
    prefill(cache, req, truth)
    row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :N].to(torch.int64)
    assert torch.equal(kv_of(cache, row), truth)
    report = cache.tier_state()["prefill"]["recent"][-1]
    assert report["loads_failed"] == 1 and report["computed_tokens"] >= CHUNK
    assert cache.tier.stats()["checksum_failures"] == 1


def test_a_request_leaving_mid_prefill_gives_every_slot_back(tmp_path):
    cache, truth = setup(tmp_path)
    before = accounted(cache)
    req = Req(TOKENS)
    assert one_round(cache, req, truth) == 64  # one chunk computed, loads running
    assert cache.tier_state()["prefill"]["active"] == 1 and cache.loads_pending()
    cache.release_aborted_request(SimpleNamespace(rid=req.rid))
    finish(cache, req)
    assert accounted(cache) == before and cache.loads_pending() == []
    assert cache.tier_state()["prefill"]["aborted"] == 1


def test_every_prefill_batch_and_whole_load_primes_the_rates(tmp_path):
    """The first bidirectional prefill of a server starts from measured rates: prefill
    batches (``Scheduler.run_batch``) and whole-hit loads feed the shared rate book."""
    cache, _ = setup(tmp_path)
    rates = cache.bidir.rates
    cache.observe_prefill(["a"], 64, 0.001)  # too small: the step's overhead, not the model
    assert rates.compute.value is None
    cache.observe_prefill(["a", "b"], 512, 2.0)
    assert rates.compute.value == 256.0
    req = Req(TOKENS, rid="whole")
    req.sampling_params.custom_params = {"kvtier_prefill": "load"}  # loaded whole
    for _ in range(5000):
        req.init_next_round_input(cache)
        if cache.admit_now(req):
            break
        time.sleep(0.002)
    assert req.prefix_len == N and rates.load.value is not None and rates.load.value > 0
    assert cache.tier_state()["prefill"]["prefills"] == 0

