"""Disk hits load while the scheduler keeps serving: the two scheduler hooks.

Targets (SGLang 0.5.23):

- ``Scheduler.get_prefill_adder_class`` (AFTER): SGLang's own ``PrefillAdder`` subclassed so
  that ``add_one_req`` first asks the tree cache's ``admit_now(req, budget)``. A request
  whose disk hit is still loading is passed over this round (``CONTINUE``: the next waiting
  request is considered) and stays in the waiting queue; the running batch decodes
  meanwhile. A hit whose slots do not fit what the round has left ends the round
  (``NO_TOKEN``, as SGLang does for a request that does not fit).
- ``Scheduler.get_next_batch_to_run`` (AFTER): when there is nothing to run and a hit is
  loading, wait on the load for up to ``IDLE_WAIT_S`` instead of spinning: an idle
  scheduler loops without sleeping while requests wait, holding the GIL that the loader
  thread's copies need.

HiCache has the same shape (``check_prefetch_progress`` skips a request until its prefetch
is done), but only when its own storage backend is on; these hooks do it for ``kvtier``.
"""

from __future__ import annotations

import functools

from sglang.srt.managers.schedule_policy import AddReqResult
from sglang.srt.plugins.hook_registry import HookType

IDLE_WAIT_S = 0.005


@functools.cache
def _adder_class(base: type) -> type:
    class KVTierPrefillAdder(base):
        """``PrefillAdder`` that leaves requests with a disk hit in flight waiting."""

        def add_one_req(self, req, *args, **kwargs):
            admit_now = getattr(self.tree_cache, "admit_now", None)
            if admit_now is not None:
                verdict = admit_now(req, min(self.rem_total_tokens, self.cur_rem_tokens))
                if verdict is None:
                    return AddReqResult.NO_TOKEN  # its load does not fit this round
                if not verdict:
                    return AddReqResult.CONTINUE  # loading: look at the next request
            return super().add_one_req(req, *args, **kwargs)

    KVTierPrefillAdder.__qualname__ = f"KVTier{base.__qualname__}"
    return KVTierPrefillAdder


def _get_prefill_adder_class(result, scheduler, *args, **kwargs):
    return _adder_class(result)


def _get_next_batch_to_run(plan, scheduler, *args, **kwargs):
    pending = getattr(scheduler.tree_cache, "loads_pending", None)
    if plan.batch_to_run is None and pending is not None and (jobs := pending()):
        jobs[0].wait(IDLE_WAIT_S)  # the loader runs jobs in order: the first is running
    return plan


HOOKS = [
    ("sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class",
     _get_prefill_adder_class, HookType.AFTER),
    ("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
     _get_next_batch_to_run, HookType.AFTER),
]
