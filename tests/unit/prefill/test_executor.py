"""The planner run for real: compute on the calling thread, loads on an I/O thread, with
callables that take real (slept) time and honour cancellation."""

import threading
import time

import pytest

from sgl_kvtier.prefill.executor import run_bidirectional
from sgl_kvtier.prefill.planner import MeetPlanner
from sgl_kvtier.prefill.rates import RateBook

N, UNIT, CHUNK = 2048, 128, 256
BOUNDS = list(range(0, N, UNIT)) + [N]
SECONDS_PER_TOKEN = 1 / 4000  # both sides: they tie, so together they halve the time


class Engine:
    """Records which tokens each side produced; sleeps stand in for the work."""

    def __init__(self, load_seconds_per_token=SECONDS_PER_TOKEN, fail=(), stall=()):
        self.lock = threading.Lock()
        self.present = [None] * N
        self.load_spt, self.fail, self.stall = load_seconds_per_token, set(fail), set(stall)
        self.cancelled = []

    def compute(self, span):
        assert all(p is not None for p in self.present[:span.start]), "computed too early"
        time.sleep((span.end - span.start) * SECONDS_PER_TOKEN)
        with self.lock:
            for i in range(span.start, span.end):
                assert self.present[i] != "loaded", f"token {i} computed after being loaded"
                self.present[i] = "computed"

    def load(self, unit, cancel):
        a, b = BOUNDS[unit], BOUNDS[unit + 1]
        wait = 60.0 if unit in self.stall else (b - a) * self.load_spt
        if cancel.wait(wait):
            self.cancelled.append(unit)
            return False
        if unit in self.fail:
            return False  # a checksum mismatch: nothing placed
        with self.lock:
            for i in range(a, b):
                if self.present[i] is None:
                    self.present[i] = "loaded"
        return True


def run(engine):
    planner = MeetPlanner(BOUNDS, CHUNK, RateBook.empty(), time.monotonic())
    start = time.monotonic()
    report = run_bidirectional(planner, engine.compute, engine.load)
    return report, time.monotonic() - start


def test_both_sides_work_at_once_and_every_token_is_produced():
    engine = Engine()
    report, seconds = run(engine)
    assert None not in engine.present
    assert report.computed_tokens + report.loaded_tokens == N
    assert report.loaded_tokens > 0 and report.computed_tokens > 0
    # Compute alone would take N * SECONDS_PER_TOKEN = 0.51 s; together about half.
    assert seconds < 0.8 * N * SECONDS_PER_TOKEN, seconds


def test_a_stalled_load_is_cancelled_and_computed():
    engine = Engine(stall={len(BOUNDS) - 2})  # the first unit the loader takes hangs
    report, seconds = run(engine)
    assert None not in engine.present
    assert engine.cancelled == [len(BOUNDS) - 2] and report.loads_cancelled == 1
    assert seconds < 5.0  # not the 60 s the read would have taken


def test_failed_loads_are_computed_never_served():
    fail = {len(BOUNDS) - 2, len(BOUNDS) - 4}
    engine = Engine(fail=fail)
    report, _ = run(engine)
    assert None not in engine.present
    for unit in fail:
        assert set(engine.present[BOUNDS[unit]:BOUNDS[unit + 1]]) == {"computed"}
    assert report.loads_failed == 2


def test_a_load_that_raises_counts_as_failed():
    engine = Engine()
    original = engine.load

    def flaky(unit, cancel):
        if unit == len(BOUNDS) - 2:
            raise OSError("EIO")
        return original(unit, cancel)

    planner = MeetPlanner(BOUNDS, CHUNK, RateBook.empty(), time.monotonic())
    report = run_bidirectional(planner, engine.compute, flaky)
    assert None not in engine.present and report.loads_failed == 1


def test_a_compute_error_stops_the_loader_and_propagates():
    engine = Engine(load_seconds_per_token=1.0)  # loads would take minutes

    def broken(span):
        raise RuntimeError("forward failed")

    planner = MeetPlanner(BOUNDS, CHUNK, RateBook.empty(), time.monotonic())
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="forward failed"):
        run_bidirectional(planner, broken, engine.load)
    assert time.monotonic() - start < 5.0 and engine.cancelled
