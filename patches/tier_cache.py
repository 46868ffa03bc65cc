"""The NVMe tier as SGLang's radix-cache backend ``kvtier``.

Registration (SGLang 0.5.23): ``sglang.srt.mem_cache.registry.register_radix_cache_backend``;
``--enable-kvtier`` with ``tier.enabled`` selects it (``--radix-cache-backend kvtier``).

:class:`KVTierRadixCache` is SGLang's ``RadixCache`` plus :class:`~sgl_kvtier.tier.service.
TierService`:

- ``match_prefix``: a device hit is extended by the whole chunks found on disk (an index
  lookup, no I/O); SGLang sees them as ``host_hit_length``.
- ``admit_now`` and ``compute_budget`` (``patches/tier_admission.py``, asked by the prefill
  adder of ``patches/tier_loads.py``): a disk hit loads on the tier's loader thread while
  the scheduler keeps serving, or, with ``prefill.enabled``, is computed from the front
  while it loads from the back (``patches/tier_prefill.py``).
- ``init_load_back``: the same load inside the scheduler step (``tier.async_load: false``,
  or a hit that reaches admission without the adder).
- ``checkpoint``: write-through. Whole chunks of what the tree now holds are offered to the
  tier; the node stays pinned until a background thread has copied them out of the pool.
- ``reset`` (``/flush_cache``): cancels every pending copy before SGLang frees the slots,
  so no chunk is ever written from slots that hold another request's KV.

Tensor parallelism: every rank has its own tier and its own copy of the scheduler, and
SGLang needs their decisions identical. Each rank reaches the same collective at every
lookup and every load, whatever happened locally (an error, a missing chunk), and the
collective carries whether each rank is still healthy: the tier is switched off on all
ranks together, and a hit is the shortest hit among them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

from sgl_kvtier.patches._state import config_of
from sgl_kvtier.patches.sparse_cache import SparseRelease
from sgl_kvtier.patches.tier_admission import BackgroundLoads, PendingLoad, report_from_disk
from sgl_kvtier.patches.tier_open import open_tier
from sgl_kvtier.patches.tier_prefill import Bidirectional
from sgl_kvtier.tier import faults
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
    node: object  # the device prefix the hit continues


class KVTierRadixCache(SparseRelease, BackgroundLoads, RadixCache):
    """``RadixCache`` whose misses may be served from the NVMe tier, and whose long
    requests may let go of their prompt when they decode sparsely."""

    def __init__(self, params, tier: TierService | None, tp_group=None,
                 async_load: bool = True, prefill=None):
        self.tier, self._tp_group, self.async_load = tier, tp_group, async_load
        self.bidir = Bidirectional(self, prefill) if prefill is not None and tier else None
        self._active = tier is not None  # agreed by all ranks: the tier is in use
        self._healthy = tier is not None  # this rank's own view, shared at the next agree
        self._markers: dict[str, _Marker] = {}
        self._offered: dict[str, int] = {}  # rid -> chunks already offered
        self._loads: dict[str, PendingLoad] = {}  # rid -> its disk hit, loading
        self._no_disk: set[str] = set()  # rids whose disk hit failed: they recompute
        self._generation = 0  # bumped by reset(): pins from an older tree are dropped
        self._metrics = None
        self.device_evicted_tokens = 0
        # Set by the prefill adder while it admits a request: () -> tokens it has left.
        self.load_budget = None
        super().__init__(params)
        # Whether every rank opened its tier is itself agreed: one rank without a tier
        # must not leave the others waiting in a collective it never reaches.
        _, everywhere = self._agree(0)
        if not everywhere and tier is not None:
            log.error("sgl_kvtier: another tensor-parallel rank could not open its NVMe tier; "
                      "serving without the tier")

    def _enabled_for(self, req) -> bool:
        # The same on every rank: nothing here depends on this rank's own tier state.
        return req is not None and self._active and not self.disable and not self.is_eagle

    # -------------------------------------------------------------------- lookups

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        rid = getattr(params.req, "rid", None)
        # The same on every rank: these sets change only on agreed decisions.
        if (not self._enabled_for(params.req) or rid in self._no_disk or rid in self._loads
                or (self.bidir is not None and rid in self.bidir.flights)):
            return result
        hit = None
        if self._healthy:
            try:
                hit = self._find(params.key, result)
            except Exception:
                self._fail("looking up a prompt")
        length, healthy = self._agree(hit.length if hit else 0)
        hit = hit.cut(length) if hit is not None and healthy else None
        if hit is None:
            self._markers.pop(params.req.rid, None)
            return result
        key = params.key
        self._markers[params.req.rid] = _Marker(
            hit, RadixKey(key.token_ids[:hit.end], key.extra_key, cache_salt=key.cache_salt),
            result.last_device_node)
        return result._replace(host_hit_length=hit.length)

    def _find(self, key: RadixKey, result: MatchResult) -> DiskHit | None:
        limit = len(key.page_aligned(self.page_size))
        # All the request's tokens key the chunks; the limit says how many may be reused.
        return self.tier.find(namespace_of(key.extra_key, key.cache_salt), key.token_ids,
                              result.device_prefix_len, limit)

    def init_load_back(self, params):
        node, req = params.best_match_node, params.req
        marker = self._markers.pop(req.rid, None) if req is not None else None
        if not self._enabled_for(req):
            return 0, node
        slots, loaded = None, False
        # Making room for the hit may evict: never the device prefix it continues.
        self.inc_lock_ref(node)
        try:
            if (self._healthy and marker is not None
                    and marker.hit.length == params.host_hit_length):
                try:
                    slots = self._alloc(marker.hit, req)
                    loaded = slots is not None and self.tier.load(marker.hit, slots)
                except Exception:
                    self._fail("loading a prompt's chunks")
                    loaded = False
            everywhere, healthy = self._agree(int(loaded))
            if everywhere and healthy:
                report_from_disk(req, marker.hit)
                return marker.hit.length, self._insert_loaded(node, marker, slots)
            if slots is not None:
                self.token_to_kv_pool_allocator.free(slots)
            return 0, node
        finally:
            self.dec_lock_ref(node)

    def _need(self, hit: DiskHit, req) -> int:
        extend = max(len(req.full_untruncated_fill_ids) - hit.end, 0)
        return hit.length + extend + _HEADROOM_TOKENS

    def _alloc(self, hit: DiskHit, req) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        need = self._need(hit, req)
        # In SGLang's admission the adder's budget also holds back what this round already
        # admitted (their extends are not allocated yet): the pool's free count does not.
        budget = self.load_budget() if self.load_budget is not None else None
        if (allocator.available_size() + self.evictable_size() < need
                or (budget is not None and budget < need)):
            return None  # recompute: loading would leave the admitted extends no room
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
        if self.decodes_sparsely(req):
            return  # its prompt is the tree's alone, its row no longer names the slots
        super().checkpoint(req, up_to=up_to)
        if not (self._active and self._healthy) or self.disable or self.is_eagle:
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
        try:
            if self.bidir is not None:
                self.bidir.free_retired()
            faults.hit("flush")
            for generation, node in self.tier.drain_written():
                if generation == self._generation:
                    self.dec_lock_ref(node)
            if self._healthy and (error := self.tier.broken()) is not None:
                self._fail(f"working in the background ({error!r})", trace=False)
            if self._metrics is not None:
                self._metrics.update(self.tier_state())
            self.tier.store.maybe_log_summary()
        except Exception:
            self._fail("finishing a batch")

    def evict(self, params):
        self.flush_pending_backups()  # copied-out nodes become evictable again
        result = super().evict(params)
        self.device_evicted_tokens += getattr(result, "num_tokens_evicted", 0) or 0
        return result

    # --------------------------------------------------------------- bookkeeping

    def reset(self):
        if getattr(self, "tier", None) is not None:
            # SGLang frees every slot right after this: no copy may read them afterwards,
            # and no load may write into them.
            self.tier.cancel_copies()
            for pending in self._loads.values():
                self._drop(pending.job, None)  # the allocator is cleared with the tree
            if self.bidir is not None:
                self.bidir.reset()
        super().reset()
        if hasattr(self, "_markers"):  # RadixCache.__init__ calls reset() before ours ran
            self._generation += 1
            self._markers.clear()
            self._offered.clear()
            self._loads.clear()
            self._no_disk.clear()

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._markers.pop(req.rid, None)
        self._offered.pop(req.rid, None)
        self._no_disk.discard(req.rid)
        if self.bidir is not None and self.bidir.abort(req.rid):
            self._no_disk.add(req.rid)  # retracted mid-prefill: it recomputes when back

    def release_host_resources(self) -> None:
        super().release_host_resources()
        if self.tier is not None:
            self.tier.close(timeout=10.0)

    def tier_state(self) -> dict:
        """Counters for ``/get_server_info``."""
        if self.tier is None:
            return {}
        return {**self.tier.stats(), "active": self._active, "healthy": self._healthy,
                "device_evicted_tokens": self.device_evicted_tokens,
                "loads_pending": len(self._loads), "async_load": self.async_load,
                "prefill": self.bidir.state() if self.bidir else {"enabled": False}}

    def _fail(self, what: str, trace: bool = True) -> None:
        """An unexpected error in the tier: log it once; this rank stops writing now and
        every rank stops using the tier at the next lookup or load (the prefix cache and
        the server keep working; copies already queued still finish)."""
        if self._healthy:
            log.error("sgl_kvtier: the NVMe tier failed while %s; serving without it from "
                      "now on", what, exc_info=trace)
        self._healthy = False
        self._markers.clear()

    def _agree(self, value: int) -> tuple[int, bool]:
        """``(min of value, all healthy)`` over the tensor-parallel ranks, each of which
        must call this at the same point; an unhealthy rank turns the tier off on all."""
        if self._tp_group is None:
            agreed, healthy = value, self._healthy
        else:
            t = torch.tensor([value, int(self._healthy)], dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN,
                                         group=self._tp_group)
            agreed, healthy = int(t[0]), bool(t[1])
        if not healthy:
            self._active = self._healthy = False
            self._markers.clear()
        return (agreed, True) if healthy else (0, False)


def _factory(ctx):
    config = config_of(ctx.server_args)
    tier = None
    if config is not None and config.tier.enabled and not ctx.disable_radix_cache:
        tier = open_tier(ctx, config.tier)
    group = ctx.params.tp_cache_group if ctx.tp_size > 1 else None
    prefill = config.prefill if config is not None and config.prefill.enabled else None
    if prefill is not None and group is not None:
        log.warning("sgl_kvtier: bidirectional prefill needs a single tensor-parallel rank "
                    "(its rounds follow this rank's clock); disk hits load whole instead")
        prefill = None
    cache = KVTierRadixCache(ctx.params, tier, group, prefill=prefill,
                             async_load=config is not None and config.tier.async_load)
    if ctx.params.enable_metrics:
        from sgl_kvtier.patches.tier_metrics import SparseMetrics, TierMetrics

        if tier is not None:
            cache._metrics = TierMetrics(ctx.tp_rank)
        if config is not None and config.sparse.enabled:
            cache.sparse_metrics = SparseMetrics(ctx.tp_rank)
    return cache


def install() -> None:
    """Idempotent: registers the ``kvtier`` radix-cache backend in this process."""
    if get_radix_cache_factory(NAME) is None:
        register_radix_cache_backend(NAME, _factory)
