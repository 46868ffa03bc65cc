"""One cached prefix produced from both ends inside a serving engine.

:func:`~sgl_kvtier.prefill.executor.run_bidirectional` owns its compute loop; an engine
does not: its scheduler runs one compute chunk per step, between other requests' batches,
and the tier's loader thread reads chunks on its own. :class:`PrefixSession` puts the
planner between the two: the loader calls :meth:`pick` and :meth:`landed`, the scheduler
calls :meth:`step` once per scheduling round with how far its computed front has got.

Positions are relative to the start of the cached prefix (the first token not already on
the device).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from sgl_kvtier.prefill.planner import MeetPlanner, PlanReport, Span, Wait
from sgl_kvtier.prefill.rates import RateBook

__all__ = ["PrefixSession", "Step"]


class Step(NamedTuple):
    """What the engine does this round.

    ``present``: every token below is computed or loaded; the engine first adopts the
    loaded ones between its computed front and ``present``. ``compute``: tokens to compute
    from ``present`` this round; 0 to wait (loads are landing); ``None`` once the whole
    prefix is present.
    """

    present: int
    compute: int | None


class PrefixSession:
    """Thread-safe planner driving for one prefix (loader thread + scheduler thread).

    Parameters
    ----------
    bounds : sequence of int
        Load-unit (tier chunk) boundaries, from 0 to the prefix length.
    compute_chunk : int
        Most tokens per compute step.
    rates : RateBook
        Shared across the engine's prefixes; updated with this one's measurements.
    """

    def __init__(self, bounds: Sequence[int], compute_chunk: int, rates: RateBook,
                 clock: Callable[[], float] = time.perf_counter):
        self._lock, self._clock = threading.Lock(), clock
        self.planner = MeetPlanner(bounds, compute_chunk, rates, clock())
        self._span: Span | None = None  # handed to the engine, not yet seen computed
        self._waiting = False  # the last round computed nothing: loads have the machine

    @property
    def report(self) -> PlanReport:
        return self.planner.report

    # ---------------------------------------------------------------- loader side

    def pick(self) -> int | None:
        """The next unit to read (from the back), or None: stop reading."""
        with self._lock:
            return self.planner.next_load(self._clock())

    def depth(self) -> int:
        """Reads the loader may run at once: one while compute runs beside it (so that
        what is loading, and since when, is what the disk is doing), as many as it has
        buffers while compute waits on the loads."""
        return self.DEEP if self._waiting else 1

    DEEP = 1 << 10

    def landed(self, unit: int, ok: bool, seconds: float) -> None:
        """Unit ``unit`` is in place (``ok``) or failed; its read took ``seconds``."""
        with self._lock:
            self.planner.load_done(unit, ok, self._clock(), seconds)

    def loader_failed(self) -> None:
        """The loader is gone: what it had not landed is computed."""
        with self._lock:
            self.planner.stop_loading(self._clock())

    # ------------------------------------------------------------- scheduler side

    def step(self, front: int) -> Step:
        """Plan this round, given that the engine has computed every token below ``front``.

        A compute span handed out earlier is reported done (and timed) once ``front`` has
        passed its start; one the engine did not run is simply planned again.
        """
        with self._lock:
            now = self._clock()
            span = self._span
            if span is not None and front > span.start:
                self.planner.compute_done(Span(span.start, min(front, span.end)), now)
                self._span = None
            planned = self.planner.next_compute(now)
            present = self.planner.front
            self._waiting = isinstance(planned, Wait)
            if planned is None:
                return Step(present, None)
            if self._waiting:
                return Step(present, 0)
            self._span = planned  # starts at the front: [front, present) is all loaded
            return Step(present, planned.end - planned.start)
