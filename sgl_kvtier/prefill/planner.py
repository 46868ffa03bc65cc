"""Who produces each part of a cached prefix: compute from the front, load from the back.

A prefix of ``N`` tokens is on the tier as *load units* (the tier's chunks, boundaries
``bounds[0] = 0 < ... < bounds[-1] = N``). Computing token ``i`` needs the KV of every
token before it; loading a unit needs nothing. So the compute side walks from the front in
chunks of up to ``compute_chunk`` tokens while the load side takes whole units from the
back, and both claim work from the unclaimed middle. They meet where the unclaimed middle
runs out, which with steady rates is where both finish together: ``k/N = R_c/(R_c+R_l)``.

Alignment: the split is always a unit boundary. A compute chunk is capped at the first unit
at or above it that is loading or loaded, so the last compute chunk may be shorter than
``compute_chunk``; a unit is loaded only while compute has claimed none of its tokens. The
tree can then take the loaded units whole behind the computed front.

Online decisions, from rates measured on this request's chunks (and a prior carried from
earlier requests, :class:`~sgl_kvtier.prefill.rates.RateBook`):

- the load side stops when its next unit would land after compute could have produced it
  (loading too slow: compute only);
- the compute side leaves the middle to the load side when loading all of it finishes
  before compute's next chunk would (compute too slow: load only);
- when compute reaches a unit still loading, it takes the unit over (the load is
  cancelled) if computing it is faster than the load's expected remainder; a stalled load
  counts as needing at least as long again as it has already taken;
- a unit whose load fails (checksum, I/O) is computed instead: never served wrong.

Thread-safety: none here; :mod:`sgl_kvtier.prefill.executor` serialises the calls.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sgl_kvtier.prefill.rates import RateBook

__all__ = ["MeetPlanner", "Span", "Wait", "PlanReport"]


class Span(NamedTuple):
    """Tokens ``[start, end)`` to compute; ``takes_over`` names a unit whose load must be
    cancelled first (compute overtook it), else ``None``."""

    start: int
    end: int
    takes_over: int | None = None


class Wait(NamedTuple):
    """Nothing to compute now; ask again after the next event or after ``seconds``."""

    seconds: float


class _Unit(enum.Enum):
    FREE = "free"
    LOADING = "loading"
    LOADED = "loaded"
    COMPUTE = "compute"  # claimed by compute (overlapped, taken over, or its load failed)


@dataclass
class PlanReport:
    """What happened to one prefix."""

    tokens: int
    split: int  # first loaded token above the computed front (== tokens when none loaded)
    computed_tokens: int = 0
    loaded_tokens: int = 0
    chunks_computed: int = 0
    chunks_loaded: int = 0
    loads_cancelled: int = 0
    loads_failed: int = 0
    compute_tokens_per_s: float | None = None
    load_tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    events: list[str] = field(default_factory=list)


class MeetPlanner:
    """The meet-in-the-middle decisions for one prefix (see the module docstring).

    Parameters
    ----------
    bounds : sequence of int
        Load-unit boundaries, strictly increasing from 0 to the prefix length ``N``.
    compute_chunk : int
        Most tokens per compute step (SGLang's chunked-prefill size for this request).
    rates : RateBook
        Prior rates; updated in place with this prefix's measurements.
    now : float
        Start time on the caller's clock.
    """

    # Taking a loading unit over must win by this factor: a near tie is not worth the
    # thrown-away I/O.
    TAKE_OVER_MARGIN = 1.25
    # Computing alongside loading must be predicted to save this much (0.9: 10%) over
    # leaving the rest to loading: where both sides share the machine (CPU cores, PCIe),
    # each slows the other, which the rates measured alone do not show.
    MIN_GAIN = 0.9

    def __init__(self, bounds: Sequence[int], compute_chunk: int, rates: RateBook,
                 now: float):
        if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must rise strictly from 0, got {list(bounds)[:8]}")
        if compute_chunk <= 0:
            raise ValueError(f"compute_chunk must be positive, got {compute_chunk}")
        self.bounds, self.chunk, self.rates = list(bounds), compute_chunk, rates
        self.n = self.bounds[-1]
        self._state = [_Unit.FREE] * (len(self.bounds) - 1)
        self._load_started: dict[int, float] = {}
        self.front = 0  # every token below is present (computed or loaded)
        self._claimed = 0  # compute has claimed every token below
        self._computing: tuple[Span, float] | None = None
        self._loader_done = False
        self._t0 = now
        self.report = PlanReport(tokens=self.n, split=self.n)

    # ------------------------------------------------------------------ queries

    def done(self) -> bool:
        self._advance()
        return self.front >= self.n

    def _size(self, j: int) -> int:
        return self.bounds[j + 1] - self.bounds[j]

    def _units_from(self, pos: int) -> range:
        # Units whose start is at or above pos.
        first = next((j for j, b in enumerate(self.bounds[:-1]) if b >= pos), len(self._state))
        return range(first, len(self._state))

    def _advance(self) -> None:
        # The front moves over loaded units that touch it.
        for j in self._units_from(self.front):
            if self.bounds[j] != self.front or self._state[j] is not _Unit.LOADED:
                break
            self.front = self.bounds[j + 1]

    def _barrier(self) -> tuple[int, int | None]:
        """First position at or above the front held by the load side, and its unit."""
        for j in self._units_from(self.front):
            if self._state[j] in (_Unit.LOADING, _Unit.LOADED):
                return self.bounds[j], j
        return self.n, None

    def _load_remaining(self, j: int, now: float) -> float:
        spent = now - self._load_started[j]
        expected = self.rates.load.seconds(self._size(j))
        # Past its expected time (or with no rate measured yet), a load is assumed to need
        # as long again as it has already taken: a stalled read is overtaken, not awaited.
        return expected - spent if expected is not None and spent < expected else spent

    def _overdue(self, j: int, now: float) -> bool:
        expected = self.rates.load.seconds(self._size(j))
        return expected is None or now - self._load_started[j] > expected

    def _compute_position(self, now: float) -> float:
        """Where compute is expected to be now (inside its running chunk, if any)."""
        if self._computing is None or self.rates.compute.value is None:
            return self.front
        (span, started) = self._computing
        return min(span.end, span.start + (now - started) * self.rates.compute.value)

    # ------------------------------------------------------------ compute side

    def next_compute(self, now: float) -> Span | Wait | None:
        """The next tokens to compute, a wait, or ``None`` when the prefix is complete."""
        self._advance()
        if self.front >= self.n:
            return None
        barrier, unit = self._barrier()
        if barrier > self.front:
            end = self._compute_end(barrier, now)
            if end <= self.front:
                return Wait(self._poll_interval())
            return self._claim(Span(self.front, end), now)
        # The unit at the front is still loading (loaded ones were advanced over).
        assert unit is not None and self._state[unit] is _Unit.LOADING
        if self._should_take_over(unit, now):
            self._state[unit] = _Unit.COMPUTE
            self._load_started.pop(unit, None)
            self.report.loads_cancelled += 1
            self.report.events.append(f"take over unit {unit} at {now - self._t0:.3f}s")
            end = min(self.front + self.chunk, self.bounds[unit + 1])
            return self._claim(Span(self.front, end, unit), now)
        return Wait(self._poll_interval())

    def _claim(self, span: Span, now: float) -> Span:
        self._claimed = max(self._claimed, span.end)
        for j in range(len(self._state)):
            if self.bounds[j] < span.end and self.bounds[j + 1] > span.start:
                if self._state[j] is _Unit.FREE:
                    self._state[j] = _Unit.COMPUTE
        self._computing = (span, now)
        return span

    def _compute_end(self, barrier: int, now: float) -> int:
        """End of the next compute chunk: at most ``chunk`` tokens (all the rest once nothing
        more will load), never past the load side, and, once both rates are known, at the
        unit boundary where both sides are predicted to be done soonest (the front itself:
        leave it all to loading)."""
        if self._loader_done and not self._load_started:
            return barrier  # nothing more will load: the rest in one go, as the engine would
        cap = min(self.front + self.chunk, barrier)
        rc, rl = self.rates.compute.value, self.rates.load.value
        in_flight = [self._load_remaining(j, now) for j in self._load_started]
        if self._loader_done or rc is None or rl is None:
            return cap
        # Compute [front, e) while loading [e, barrier) after the loads in flight; the best
        # e balances (e - f) / rc against sum(in_flight) + (b - e) / rl.
        f, b = self.front, barrier
        stops = [x for x in self.bounds if f < x <= b]
        if self.front in self.bounds and all(
                self._state[j] is _Unit.FREE for j in self._units_from(f) if self.bounds[j] < b):
            stops.append(f)  # all of [f, b) is loadable: computing none of it is an option
        def finish(x: int) -> tuple[float, int]:
            # Predicted time until both sides are done; on a tie, compute less (other
            # requests need the compute side, not the disk).
            x_end = min(x, cap)
            return max((x_end - f) / rc, sum(in_flight) + (b - x_end) / rl), x_end

        best_time, end = min(finish(x) for x in stops)
        # Leave it to loading only on a small gain, and never while a load is overdue (a
        # stalled read must be overtaken by compute, not waited for).
        if (f in stops and best_time > self.MIN_GAIN * finish(f)[0]
                and not any(self._overdue(j, now) for j in self._load_started)):
            return f  # computing would save too little to pay for sharing the machine
        return end

    def _should_take_over(self, unit: int, now: float) -> bool:
        remaining = self._load_remaining(unit, now)
        compute = self.rates.compute.seconds(min(self.chunk, self._size(unit)))
        if compute is None:
            return False
        return compute * self.TAKE_OVER_MARGIN < remaining

    def _poll_interval(self) -> float:
        t = self.rates.compute.seconds(min(self.chunk, self.n)) or 0.01
        return max(t / 8, 1e-4)

    def compute_done(self, span: Span, now: float) -> None:
        """``span`` has been computed (its KV is in place)."""
        started = self._computing[1] if self._computing else now
        self.rates.compute.add(span.end - span.start, now - started)
        self._computing = None
        self.front = max(self.front, span.end)
        self.report.computed_tokens += span.end - span.start
        self.report.chunks_computed += 1
        self._finish(now)

    # --------------------------------------------------------------- load side

    def next_load(self, now: float) -> int | None:
        """The next unit to load (from the back), or ``None``: the load side is finished."""
        if self._loader_done:
            return None
        candidates = [j for j in reversed(self._units_from(self._claimed))
                      if self._state[j] is _Unit.FREE]
        if not candidates or not self._worth_loading(candidates[0], now):
            self._loader_done = True
            return None
        j = candidates[0]
        self._state[j] = _Unit.LOADING
        self._load_started[j] = now
        return j

    def _worth_loading(self, j: int, now: float) -> bool:
        # Loading too slow: compute, at its current pace, would have produced the unit
        # before the load could land it.
        load = self.rates.load.seconds(self._size(j))
        rate = self.rates.compute.value
        if load is None or rate is None:
            return True
        compute_reaches_end = (self.bounds[j + 1] - self._compute_position(now)) / rate
        return load < compute_reaches_end

    def load_done(self, j: int, ok: bool, now: float, seconds: float | None = None) -> None:
        """Unit ``j`` finished loading: ``ok`` if its KV is in place and verified.
        ``seconds``: how long the load itself took, when loads queue behind each other
        (else from :meth:`next_load` to ``now``)."""
        started = self._load_started.pop(j, None)
        if self._state[j] is not _Unit.LOADING:  # taken over meanwhile: its bytes are unused
            return
        if ok:
            self._state[j] = _Unit.LOADED
            if seconds is not None or started is not None:
                self.rates.load.add(self._size(j), now - started if seconds is None else seconds)
            self.report.loaded_tokens += self._size(j)
            self.report.chunks_loaded += 1
        else:
            # Never served: these tokens are computed instead.
            self._state[j] = _Unit.COMPUTE
            self.report.loads_failed += 1
            self.report.events.append(f"unit {j} failed to load: computed instead")
        self._finish(now)

    def loads_in_flight(self) -> list[int]:
        return sorted(self._load_started)

    def stop_loading(self, now: float) -> None:
        """The load side is gone (an error): units still loading are computed instead."""
        self._loader_done = True
        for j in self.loads_in_flight():
            self.load_done(j, False, now)

    # ------------------------------------------------------------------ report

    def _finish(self, now: float) -> None:
        self._advance()
        self.report.elapsed_s = now - self._t0
        self.report.compute_tokens_per_s = self.rates.compute.value
        self.report.load_tokens_per_s = self.rates.load.value
        loaded = [self.bounds[j] for j, s in enumerate(self._state) if s is _Unit.LOADED]
        self.report.split = min(loaded) if loaded else self.n
