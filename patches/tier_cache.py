"""The NVMe tier as SGLang's radix-cache backend ``kvtier``.

Registration (SGLang 0.5.23): ``sglang.srt.mem_cache.registry.register_radix_cache_backend``;
``--enable-kvtier`` with ``tier.enabled`` selects it (``--radix-cache-backend kvtier``).

:class:`KVTierRadixCache` is SGLang's ``RadixCache`` plus :class:`~sgl_kvtier.tier.service.
TierService`:

- ``match_prefix``: a device hit is extended by the whole chunks found on disk (an index
  lookup, no I/O); SGLang sees them as ``host_hit_length``.
- ``init_load_back``: allocates slots, reads the chunks into them (parallel reads ahead of
  the copies), and inserts them under the device prefix; SGLang then computes only the
  rest and reports the tokens as cached. Any chunk failing its checksum makes the whole
  hit a miss (SGLang requires all promised tokens or none): the prompt is recomputed.
- ``checkpoint``: write-through. Whole chunks of what the tree now holds are offered to the
  tier; the node stays pinned until a background thread has copied them out of the pool.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sglang.srt.mem_cache.base_prefix_cache import (EvictParams, InsertParams,
                                                    MatchPrefixParams, MatchResult)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.registry import (get_radix_cache_factory,
                                           register_radix_cache_backend)

from sgl_kvtier.config import TierConfig
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig, TierLocked
from sgl_kvtier.tier.identity import model_identity
from sgl_kvtier.tier.kv_transfer import KVPool
from sgl_kvtier.tier.service import DiskHit, TierService, namespace_of

log = logging.getLogger("sgl_kvtier")
NAME = "kvtier"
# Tokens kept free beyond a disk hit and the request's own extend, so that loading a hit
# never starves the extend SGLang admitted on a budget computed before the load.
_HEADROOM_TOKENS = 256


@dataclass
class _Marker:
    """What the last ``match_prefix`` of a request promised SGLang."""

    hit: DiskHit
    key: RadixKey  # a copy: SGLang keeps growing the request's token list


class KVTierRadixCache(RadixCache):
    """``RadixCache`` whose misses may be served from the NVMe tier."""

    def __init__(self, params, tier: TierService | None, tp_group=None):
        self.tier, self._tp_group = tier, tp_group
        self._active = tier is not None  # False after an unexpected error: serve without it
        self._markers: dict[str, _Marker] = {}
        self._offered: dict[str, int] = {}  # rid -> chunks already offered
        self._generation = 0  # bumped by reset(): pins from an older tree are dropped
        self._metrics = None
        super().__init__(params)

    # -------------------------------------------------------------------- lookups

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or not self._active or self.disable or self.is_eagle:
            return result
        try:
            return self._extend_match(params.key, req, result)
        except Exception:
            self._fail("looking up a prompt")
            return result

    def _extend_match(self, key: RadixKey, req, result: MatchResult) -> MatchResult:
        limit = len(key.page_aligned(self.page_size))
        # All the request's tokens key the chunks; the limit says how many may be reused.
        hit = self.tier.find(namespace_of(key.extra_key, key.cache_salt), key.token_ids,
                             result.device_prefix_len, limit)
        length = self._agree(hit.length if hit else 0)
        if hit is None or length < hit.length:
            self._markers.pop(req.rid, None)
            return result
        self._markers[req.rid] = _Marker(hit, RadixKey(key.token_ids[:hit.end], key.extra_key,
                                                       cache_salt=key.cache_salt))
        return result._replace(host_hit_length=hit.length)

    def init_load_back(self, params):
        node = params.best_match_node
        marker = self._markers.pop(params.req.rid, None) if params.req is not None else None
        if marker is None or marker.hit.length != params.host_hit_length or not self._active:
            return 0, node
        slots = None
        try:
            slots = self._alloc(marker.hit, params.req)
            loaded = slots is not None and self.tier.load(marker.hit, slots)
            if self._agree(int(loaded)):
                return marker.hit.length, self._insert_loaded(node, marker, slots)
        except Exception:
            self._fail("loading a prompt's chunks")
        if slots is not None:
            self.token_to_kv_pool_allocator.free(slots)
        return 0, node

    def _alloc(self, hit: DiskHit, req) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        extend = max(len(req.full_untruncated_fill_ids) - hit.end, 0) if req is not None else 0
        need = hit.length + extend + _HEADROOM_TOKENS
        if allocator.available_size() + self.evictable_size() < need:
            return None  # recompute: loading would leave the admitted extend no room
        if allocator.available_size() < hit.length:
            self.evict(EvictParams(num_tokens=hit.length - allocator.available_size()))
        return allocator.alloc(hit.length)

    def _insert_loaded(self, node, marker: _Marker, slots: torch.Tensor):
        prefix = self.path_device_indices(node)
        result = self.insert(InsertParams(key=marker.key, value=torch.cat([prefix, slots])))
        duplicate = result.prefix_len - len(prefix)
        if duplicate > 0:  # part of the hit reached the device meanwhile: keep the tree's
            self.token_to_kv_pool_allocator.free(slots[:duplicate])
        return super().match_prefix(MatchPrefixParams(key=marker.key)).last_device_node

    # --------------------------------------------------------------------- writes

    def checkpoint(self, req, *, up_to: int):
        super().checkpoint(req, up_to=up_to)
        if not self._active or self.disable or self.is_eagle:
            return
        owned = req.kv.cache_protected_len  # what the tree now holds for this request
        done = self._offered.get(req.rid, 0)
        if owned // self.tier.chunk <= done:
            return
        node = req.last_node
        self.inc_lock_ref(node)  # the copy reads these slots on another thread
        slots = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :owned]
        try:
            self._offered[req.rid] = self.tier.offer(
                namespace_of(req.extra_key, req.cache_salt),
                req.full_untruncated_fill_ids[:owned], slots.to(torch.int64), done,
                (self._generation, node))
        except Exception:
            self.dec_lock_ref(node)
            self._fail("offering a prompt's chunks for writing")

    def flush_pending_backups(self) -> None:
        """Called by the scheduler after every batch: unpin copied-out nodes, report."""
        super().flush_pending_backups()
        if self.tier is None:
            return
        for generation, node in self.tier.drain_written():
            if generation == self._generation:
                self.dec_lock_ref(node)
        if self._metrics is not None:
            self._metrics.update(self.tier.stats())
        self.tier.store.maybe_log_summary()

    def evict(self, params):
        self.flush_pending_backups()  # copied-out nodes become evictable again
        return super().evict(params)

    # --------------------------------------------------------------- bookkeeping

    def reset(self):
        super().reset()
        if hasattr(self, "_markers"):  # RadixCache.__init__ calls reset() before ours ran
            self._generation += 1
            self._markers.clear()
            self._offered.clear()

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._markers.pop(req.rid, None)
        self._offered.pop(req.rid, None)

    def release_host_resources(self) -> None:
        super().release_host_resources()
        if self.tier is not None:
            self.tier.close(timeout=10.0)

    def tier_state(self) -> dict:
        """Counters for ``/get_server_info``."""
        if self.tier is None:
            return {}
        return {**self.tier.stats(), "active": self._active}

    def _fail(self, what: str) -> None:
        """An unexpected error in the tier: log it once and go on without the tier (the
        prefix cache and the server keep working; copies already queued still finish)."""
        log.exception("sgl_kvtier: the NVMe tier failed while %s; serving without it from "
                      "now on", what)
        self._active = False
        self._markers.clear()

    def _agree(self, value: int) -> int:
        """The minimum of ``value`` over tensor-parallel ranks (each has its own tier)."""
        if self._tp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self._tp_group)
        return int(t.item())


def _fingerprint(ctx, pool) -> ModelFingerprint:
    args = ctx.server_args
    identity = model_identity(args.model_path, str(getattr(args, "load_format", "auto")),
                              getattr(args, "revision", None))
    return ModelFingerprint(model=identity, dtype=str(pool.store_dtype),
                            num_layers=pool.layer_num, num_kv_heads=pool.head_num,
                            head_dim=pool.head_dim, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                            layout=f"layer,kv,token,head,dim;start_layer={pool.start_layer}")


def _open_tier(ctx, config: TierConfig) -> TierService:
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    page = ctx.params.page_size
    if config.chunk_tokens % page:
        raise ValueError(f"kvtier: tier.chunk_tokens ({config.chunk_tokens}) must be a "
                         f"multiple of --page-size ({page})")
    root = Path(config.path).expanduser() / f"tp{ctx.tp_rank}-of-{ctx.tp_size}"
    store_config = StoreConfig(root=root, capacity_bytes=config.capacity,
                               admission=config.admission,
                               read_bandwidth_limit=config.read_bandwidth_limit,
                               read_threads=config.io_threads, direct_io=config.direct_io)
    start = time.perf_counter()
    try:
        store = ChunkStore(store_config)
    except TierLocked:
        raise RuntimeError(f"kvtier: tier.path {root} is used by another running server; "
                           f"give each server its own tier.path") from None
    tier = TierService(store, _fingerprint(ctx, pool), config.chunk_tokens,
                       KVPool(list(pool.k_buffer), list(pool.v_buffer)))
    stats = store.stats()
    log.info("sgl_kvtier: NVMe tier at %s: %d chunks (%.2f GiB of %.2f GiB), opened in %.2f s; "
             "chunk %d tokens = %.1f MiB; admission %s; O_DIRECT %s%s", root, stats["chunks"],
             stats["used_bytes"] / 2**30, config.capacity / 2**30, time.perf_counter() - start,
             config.chunk_tokens, tier.layout.nbytes / 2**20, config.admission,
             "on" if stats["direct_io"] else "off",
             f"; reads capped at {config.read_bandwidth_limit / 1e6:.0f} MB/s"
             if config.read_bandwidth_limit else "")
    return tier


def _factory(ctx):
    from sgl_kvtier.config import KVTierConfig

    received = getattr(ctx.server_args, "_kvtier", None)
    config = KVTierConfig.model_validate(received["config"]).tier if received else TierConfig()
    tier = None if ctx.disable_radix_cache else _open_tier(ctx, config)
    group = ctx.params.tp_cache_group if ctx.tp_size > 1 else None
    cache = KVTierRadixCache(ctx.params, tier, group)
    if tier is not None and ctx.params.enable_metrics:
        from sgl_kvtier.patches.tier_metrics import TierMetrics

        cache._metrics = TierMetrics(ctx.tp_rank)
    return cache


def install() -> None:
    """Idempotent: registers the ``kvtier`` radix-cache backend in this process."""
    if get_radix_cache_factory(NAME) is None:
        register_radix_cache_backend(NAME, _factory)
