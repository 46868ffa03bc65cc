"""PrefixSession: the planner between an engine's scheduler rounds and its loader thread,
on a hand-driven clock."""

from sgl_kvtier.prefill.rates import Rate, RateBook
from sgl_kvtier.prefill.session import PrefixSession, Step

BOUNDS = [0, 256, 512, 768, 1024]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def session(rates=None):
    clock = Clock()
    return PrefixSession(BOUNDS, 256, rates or RateBook.empty(), clock), clock


def test_compute_from_the_front_loads_from_the_back_and_the_front_jumps_over_loads():
    s, clock = session()
    assert s.pick() == 3  # the loader starts at the back
    assert s.step(0) == Step(0, 256)  # no rates yet: one compute chunk
    clock.t = 1.0
    s.landed(3, True, 1.0)
    assert s.pick() == 2
    assert s.step(256) == Step(256, 256)  # chunk 1 computed (and timed): plan chunk 2
    clock.t = 2.0
    s.landed(2, True, 1.0)
    assert s.pick() is None  # compute has claimed everything else
    # Compute reaches 512: units 2 and 3 are loaded, so the whole prefix is present.
    assert s.step(512) == Step(1024, None)
    r = s.report
    assert (r.split, r.computed_tokens, r.loaded_tokens) == (512, 512, 512)
    assert r.compute_tokens_per_s == 256.0 and r.load_tokens_per_s == 256.0


def test_a_round_the_engine_skipped_is_planned_again_not_counted():
    s, clock = session()
    assert s.step(0) == Step(0, 256)
    clock.t = 0.5
    assert s.step(0) == Step(0, 256)  # nothing computed (no room this round): same span
    assert s.report.chunks_computed == 0


def test_waits_while_the_unit_at_the_front_is_landing_fast():
    # Loading is far faster: after the first chunk the planner leaves the rest to loads.
    s, clock = session(RateBook(Rate(value=100.0), Rate(value=100_000.0)))
    units = [s.pick(), s.pick(), s.pick()]
    assert units == [3, 2, 1]
    step = s.step(0)
    assert step.compute == 0  # leave it all to loading
    for j in units:
        s.landed(j, True, 0.003)
    assert s.pick() == 0
    s.landed(0, True, 0.003)
    assert s.step(0) == Step(1024, None) and s.report.split == 0


def test_a_failed_unit_is_computed_and_a_dead_loader_leaves_the_rest_to_compute():
    s, clock = session()
    assert s.pick() == 3
    assert s.step(0) == Step(0, 256)
    clock.t = 1.0
    s.landed(3, False, 1.0)  # checksum failed: never served
    assert s.pick() == 2
    s.loader_failed()  # e.g. the loader thread hit a bug: unit 2 will not land
    steps, front = [], 256
    while (step := s.step(front)).compute is not None:
        steps.append(step)
        front = step.present + step.compute
    assert step.present == 1024 and front == 1024
    assert s.report.loaded_tokens == 0 and s.report.loads_failed == 2


def test_reads_go_deep_only_while_compute_waits_on_them():
    s, clock = session(RateBook(Rate(value=100.0), Rate(value=100_000.0)))
    assert s.depth() == 1  # before the first round: compute may start beside the loads
    assert s.step(0).compute == 0  # loading is far faster: compute steps aside
    assert s.depth() > 8
    s2, _ = session()
    assert s2.step(0).compute == 256 and s2.depth() == 1
