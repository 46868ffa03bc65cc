"""Disk hits admitted without stopping the scheduler: the ``KVTierRadixCache`` methods
that ``patches/tier_loads.py``'s prefill adder calls each round.

- ``admit_now``: a waiting request's disk hit is given slots and submitted to the tier's
  loader thread; the request stays waiting while the scheduler runs the others, and joins
  the tree (and is admitted) once its chunks are in. A hit long enough for bidirectional
  prefill is instead admitted at once, its front computed while its back loads
  (``patches/tier_prefill.py``), and ``compute_budget`` caps each of its chunks.
- Any failure (a chunk failing its checksum, no room) means the request recomputes.

Every decision reaches the same tensor-parallel collective on every rank (``_agree``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_kvtier.patches.tier_prefill import method_of
from sgl_kvtier.tier.loader import LoadJob


@dataclass
class PendingLoad:
    """A disk hit on the loader thread; its device prefix stays locked meanwhile."""

    job: LoadJob
    marker: object  # tier_cache._Marker
    req: object


def report_from_disk(req, hit) -> None:
    # SGLang's per-request cache breakdown (cached_tokens_details) then counts these tokens
    # as "storage", its name for the tier below host memory.
    req.storage_hit_length, req.storage_hit_start = hit.length, hit.device_len


class BackgroundLoads:
    """Mixed into ``KVTierRadixCache`` (which provides the tree, the tier and ``_agree``)."""

    def admit_now(self, req, budget: int | None = None) -> bool | None:
        """Whether SGLang may admit ``req`` this round (``patches/tier_loads.py`` asks just
        before ``PrefillAdder.add_one_req``): True to admit it now; False while its disk
        hit is loading (the request stays waiting, the scheduler runs the others); None
        when the load does not fit this round (the adder stops, as on SGLang's NO_TOKEN).

        ``budget`` is what the adder may still hand out this round (tokens): requests it
        already admitted count on the pool's free slots, so a load starts only when its
        slots and the request's own extend fit in what is left."""
        if not (self.async_load and self._enabled_for(req)):
            return True
        pending = self._loads.get(req.rid)
        if pending is not None:
            return self._finish_load(req, pending)
        marker = self._markers.get(req.rid)
        if marker is None:
            return True
        # The device prefix the hit continues is locked first (making room may evict, and
        # the load joins the tree under it), and what the lock takes out of the evictable
        # pool counts against the budget: the adder's figure still counted it as free.
        taken = self._lock_prefix(marker.node)
        need = self._need(marker.hit, req) + taken
        fits, _ = self._agree(int(budget is None or need <= budget))
        if self.bidir is not None and method_of(req) == "compute":
            self.dec_lock_ref(marker.node)
            self._recompute(req)
            return True
        if not fits:
            self.dec_lock_ref(marker.node)
            return None
        if self.bidir is not None and self.bidir.wants(marker.hit, req):
            return self._start_bidirectional(req, marker)
        return self._start_load(req, marker)

    def _lock_prefix(self, node) -> int:
        """Lock ``node``'s path; returns the tokens that left the evictable pool."""
        before = self.evictable_size()
        self.inc_lock_ref(node)
        return before - self.evictable_size()

    def _start_bidirectional(self, req, marker) -> bool:
        """``marker.node`` is locked (``admit_now``); unlocked here if it does not start."""
        self._markers.pop(req.rid, None)
        started = False
        try:
            started = self._healthy and self.bidir.start(req, marker)
        except Exception:
            self._fail("starting a bidirectional prefill")
        if not started:
            self.dec_lock_ref(marker.node)
            self._recompute(req)
        return True

    def observe_prefill(self, rids: list[str], tokens: int, seconds: float) -> None:
        """A prefill batch ran (``patches/tier_loads.py``): a compute-rate sample."""
        if self.bidir is not None:
            self.bidir.observe_compute(rids, tokens, seconds)

    def compute_budget(self, req, decoding: bool = False) -> int | None:
        """Tokens ``req`` may compute this round while part of its prefix is loading (0:
        none yet), or None: no limit (``patches/tier_loads.py`` asks every round).
        ``decoding``: other requests are decoding (they get a step between chunks)."""
        return None if self.bidir is None else self.bidir.budget(req, decoding)

    def _start_load(self, req, marker) -> bool:
        """``marker.node`` is locked (``admit_now``) until the loaded slots join the tree
        under it: the prefix the hit continues must stay."""
        job = slots = None
        if self._healthy:
            try:
                slots = self._alloc(marker.hit, req)
                job = slots is not None and self.tier.submit_load(marker.hit, slots)
            except Exception:
                self._fail("loading a prompt's chunks")
        started, healthy = self._agree(int(bool(job)))
        if started and healthy:
            self._markers.pop(req.rid, None)
            self._loads[req.rid] = PendingLoad(job, marker, req)
            return False
        self.dec_lock_ref(marker.node)
        self._drop(job, slots)
        self._recompute(req)
        return True

    def _finish_load(self, req, pending: PendingLoad) -> bool:
        job = pending.job
        done, _ = self._agree(int(job.done() or not self._healthy))
        if not done:
            return False
        del self._loads[req.rid]
        if job.done() and job.error is not None:
            self._fail("loading a prompt's chunks in the background")
        loaded, healthy = self._agree(int(bool(job.done() and job.ok)))
        if loaded and healthy:
            if self.bidir is not None:  # a load-rate sample for bidirectional prefill
                self.bidir.rates.load.add(pending.marker.hit.length, job.seconds)
            self._insert_loaded(pending.marker.node, pending.marker, job.slots)
            self.dec_lock_ref(pending.marker.node)
            req.init_next_round_input(self)  # its prefix now reaches past the loaded tokens
            report_from_disk(req, pending.marker.hit)
            return True
        self.dec_lock_ref(pending.marker.node)
        self._drop(job, job.slots)
        self._recompute(req)
        return True

    def _drop(self, job: LoadJob | None, slots: torch.Tensor | None) -> None:
        if job:
            job.cancel()
            job.wait()  # nothing may write into the slots once they are free
        if slots is not None:
            self.token_to_kv_pool_allocator.free(slots)

    def _recompute(self, req) -> None:
        self._markers.pop(req.rid, None)
        self._no_disk.add(req.rid)
        req.init_next_round_input(self)  # no disk hit any more: SGLang computes it

    def loads_pending(self) -> list[LoadJob]:
        """Jobs still on the loader thread, in the order they run."""
        jobs = [p.job for p in self._loads.values()]
        return jobs + (self.bidir.jobs() if self.bidir is not None else [])

    def release_aborted_request(self, handle) -> None:
        """SGLang drops a request it aborted (e.g. a client that went away while its hit
        was loading): stop the load and give its slots back."""
        super().release_aborted_request(handle)
        pending = self._loads.pop(handle.rid, None)
        if pending is not None:
            self.dec_lock_ref(pending.marker.node)
            self._drop(pending.job, pending.job.slots)
        self._markers.pop(handle.rid, None)
        self._no_disk.discard(handle.rid)
        if self.bidir is not None:
            self.bidir.abort(handle.rid)
