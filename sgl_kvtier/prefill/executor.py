"""Run a :class:`~sgl_kvtier.prefill.planner.MeetPlanner` for real: compute on the calling
thread, loads on one I/O thread, both asking the planner for their next piece of work.

The two callables are the engine's; this module knows nothing about models or disks:

- ``compute(span)`` produces the KV of tokens ``[span.start, span.end)``; every token
  before ``span.start`` is present when it is called;
- ``load(unit, cancel)`` reads unit ``unit`` into place and returns whether its bytes were
  verified; it should return early (any value) once ``cancel`` is set, which happens when
  compute takes the unit over.

A load that raises counts as a failed load (its tokens are computed); a compute that raises
cancels the loads and propagates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sgl_kvtier.prefill.planner import MeetPlanner, PlanReport, Span, Wait

__all__ = ["run_bidirectional"]

log = logging.getLogger("sgl_kvtier")


def run_bidirectional(planner: MeetPlanner, compute: Callable[[Span], None],
                      load: Callable[[int, threading.Event], bool],
                      clock: Callable[[], float] = time.monotonic) -> PlanReport:
    """Produce the whole prefix; returns the planner's report (split, counts, rates)."""
    cond = threading.Condition()
    cancels: dict[int, threading.Event] = {}
    stop = threading.Event()

    def loader() -> None:
        while not stop.is_set():
            with cond:
                unit = planner.next_load(clock())
                if unit is None:
                    return
                cancel = cancels[unit] = threading.Event()
            try:
                ok = bool(load(unit, cancel))
            except Exception:
                log.exception("sgl_kvtier: loading unit %d failed; computing it instead", unit)
                ok = False
            with cond:
                planner.load_done(unit, ok and not cancel.is_set(), clock())
                cond.notify_all()

    thread = threading.Thread(target=loader, name="kvtier-prefill-load", daemon=True)
    thread.start()
    try:
        _compute_loop(planner, compute, cond, cancels, clock)
    finally:
        stop.set()
        for event in cancels.values():
            event.set()
        thread.join()
    return planner.report


def _compute_loop(planner, compute, cond, cancels, clock) -> None:
    while True:
        with cond:
            step = planner.next_compute(clock())
            if step is None:
                return
            if isinstance(step, Wait):
                cond.wait(step.seconds)
                continue
            if step.takes_over is not None:
                cancels[step.takes_over].set()
        compute(step)
        with cond:
            planner.compute_done(step, clock())
