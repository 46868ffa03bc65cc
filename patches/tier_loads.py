"""Disk hits load while the scheduler keeps serving: the two scheduler hooks.

Targets (SGLang 0.5.23):

- ``Scheduler.get_prefill_adder_class`` (AFTER): SGLang's own ``PrefillAdder`` subclassed so
  that ``add_one_req`` first asks the tree cache's ``admit_now(req, budget)``. A request
  whose disk hit is still loading is passed over this round (``CONTINUE``: the next waiting
  request is considered) and stays in the waiting queue; the running batch decodes
  meanwhile. A hit whose slots do not fit what the round has left ends the round
  (``NO_TOKEN``, as SGLang does for a request that does not fit).
  With bidirectional prefill (``patches/tier_prefill.py``), ``add_one_req`` and
  ``add_chunked_req`` also cap each chunk of a request whose prefix is loading from the
  back at what the tree cache's ``compute_budget`` allows, so that compute never runs into
  the loaded part; a request with nothing to compute yet sits the round out, and so does
  one that computed a chunk last round while others are decoding (they get that step).
  While it admits a request it lends the tree cache ``load_budget`` (what the round has
  left), so that a load inside SGLang's admission (``init_load_back``) never takes the room
  of requests admitted before it.
- ``Scheduler.get_next_batch_to_run`` (AFTER): when there is nothing to run and a hit is
  loading, wait on the load for up to ``IDLE_WAIT_S`` instead of spinning: an idle
  scheduler loops without sleeping while requests wait, holding the GIL that the loader
  thread's copies need.

- ``Scheduler.run_batch`` (AROUND): times prefill batches, so bidirectional prefill starts
  with a measured compute rate (on a GPU with the overlap scheduler this times the launch,
  and the request's own chunks correct it).

HiCache has the same shape (``check_prefetch_progress`` skips a request until its prefetch
is done), but only when its own storage backend is on; these hooks do it for ``kvtier``.
"""

from __future__ import annotations

import functools
import time

from sglang.srt.managers.schedule_policy import AddReqResult
from sglang.srt.plugins.hook_registry import HookType

IDLE_WAIT_S = 0.005


@functools.cache
def _adder_class(base: type) -> type:
    class KVTierPrefillAdder(base):
        """``PrefillAdder`` that leaves requests with a disk hit in flight waiting."""

        def add_one_req(self, req, has_chunked_req, *args, **kwargs):
            if not hasattr(self.tree_cache, "admit_now"):
                return super().add_one_req(req, has_chunked_req, *args, **kwargs)
            # A load inside SGLang's own admission (init_load_back) asks what is left then.
            self.tree_cache.load_budget = self._remaining
            try:
                return self._add_one_req(req, has_chunked_req, *args, **kwargs)
            finally:
                self.tree_cache.load_budget = None

        def _remaining(self) -> int:
            return min(self.rem_total_tokens, self.cur_rem_tokens)

        def _add_one_req(self, req, has_chunked_req, *args, **kwargs):
            admit_now = self.tree_cache.admit_now
            verdict = admit_now(req, self._remaining())
            if verdict is None:
                return AddReqResult.NO_TOKEN  # its load does not fit this round
            if not verdict:
                return AddReqResult.CONTINUE  # loading: look at the next request
            cap = self.tree_cache.compute_budget(req, self._decoding())
            if cap is None:
                return super().add_one_req(req, has_chunked_req, *args, **kwargs)
            if cap == 0 or has_chunked_req:  # one chunked request at a time (SGLang's rule)
                return AddReqResult.CONTINUE
            return self._capped(cap, super().add_one_req, req, has_chunked_req, *args,
                                **kwargs)

        def add_chunked_req(self, req):
            budget = getattr(self.tree_cache, "compute_budget", None)
            cap = None if budget is None else budget(req, self._decoding())
            if cap is None:
                return super().add_chunked_req(req)
            if cap == 0:  # waiting for loads: it sits this round out, still chunked
                self.rem_chunk_tokens = 0
                return req
            return self._capped(cap, super().add_chunked_req, req)

        def _decoding(self) -> bool:
            return self.running_batch is not None and not self.running_batch.is_empty()

        def _capped(self, cap, add, *args, **kwargs):
            # A shorter chunk than SGLang would take; the request stays chunked, and no
            # other request may start a chunked prefill this round.
            saved = self.rem_chunk_tokens
            self.rem_chunk_tokens = cap if saved is None else min(saved, cap)
            try:
                return add(*args, **kwargs)
            finally:
                self.rem_chunk_tokens = 0

    KVTierPrefillAdder.__qualname__ = f"KVTier{base.__qualname__}"
    return KVTierPrefillAdder


def _get_prefill_adder_class(result, scheduler, *args, **kwargs):
    return _adder_class(result)


def _get_next_batch_to_run(plan, scheduler, *args, **kwargs):
    pending = getattr(scheduler.tree_cache, "loads_pending", None)
    if plan.batch_to_run is None and pending is not None and (jobs := pending()):
        jobs[0].wait(IDLE_WAIT_S)  # the loader runs jobs in order: the first is running
    return plan


def _run_batch(original, scheduler, batch, *args, **kwargs):
    observe = getattr(scheduler.tree_cache, "observe_prefill", None)
    if observe is None or batch is None or not batch.forward_mode.is_extend():
        return original(scheduler, batch, *args, **kwargs)
    start = time.perf_counter()
    result = original(scheduler, batch, *args, **kwargs)
    observe([r.rid for r in batch.reqs], batch.extend_num_tokens or 0,
            time.perf_counter() - start)
    return result


HOOKS = [
    ("sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class",
     _get_prefill_adder_class, HookType.AFTER),
    ("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
     _get_next_batch_to_run, HookType.AFTER),
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", _run_batch, HookType.AROUND),
]
