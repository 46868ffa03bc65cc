"""The bidirectional-prefill planner on a simulated clock: where it meets, how close to the
best possible time, and what it does when rates change, stall, lie or fail."""

import math

import pytest

from sgl_kvtier.prefill.planner import MeetPlanner, Span, Wait
from sgl_kvtier.prefill.rates import Rate, RateBook
from sgl_kvtier.prefill.simulate import constant, harmonic_bound, simulate

N, UNIT, CHUNK = 4096, 256, 512
BOUNDS = list(range(0, N, UNIT)) + [N]


def produced_once(r, bounds=BOUNDS):
    """Every token comes from exactly one side: computed spans and loaded units tile [0, N)."""
    covered = sorted([tuple(s) for s in r.computed] +
                     [(bounds[j], bounds[j + 1]) for j in r.loaded])
    pos = 0
    for a, b in covered:
        assert a == pos, f"gap or overlap at {pos}: {covered}"
        pos = b
    assert pos == bounds[-1]


def test_the_split_must_be_a_unit_boundary_and_bounds_must_rise():
    with pytest.raises(ValueError, match="bounds must rise"):
        MeetPlanner([0, 256, 256], CHUNK, RateBook.empty(), 0.0)
    with pytest.raises(ValueError, match="compute_chunk"):
        MeetPlanner(BOUNDS, 0, RateBook.empty(), 0.0)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_constant_rates_sit_on_the_bound_and_beat_both_single_methods(ratio):
    # Load rate from 4x slower to 4x faster than compute (the sweep).
    rc, rl = 1000.0, 1000.0 * ratio
    r = simulate(BOUNDS, CHUNK, constant(rc), constant(rl))
    produced_once(r)
    bound = harmonic_bound(N, rc, rl)
    assert r.seconds <= 1.15 * bound, (r.seconds, bound)
    assert r.seconds < min(N / rc, N / rl)
    # The split sits near k/N = R_c / (R_c + R_l), within a compute chunk.
    assert abs(r.report.split - N * rc / (rc + rl)) <= CHUNK
    assert r.report.computed_tokens + r.report.loaded_tokens == N


def test_at_the_tie_it_is_twice_as_fast_as_either_method():
    r = simulate(BOUNDS, CHUNK, constant(1000), constant(1000))
    assert r.seconds == pytest.approx(N / 2000, rel=0.02)
    assert r.report.split == N // 2


def test_the_report_names_split_counts_and_measured_rates():
    r = simulate(BOUNDS, CHUNK, constant(1000), constant(3000))
    rep = r.report
    assert rep.chunks_loaded == len(r.loaded) and rep.chunks_computed == len(r.computed)
    assert rep.loaded_tokens == N - rep.split
    assert rep.compute_tokens_per_s == pytest.approx(1000)
    assert rep.load_tokens_per_s == pytest.approx(3000)
    assert rep.elapsed_s == pytest.approx(r.seconds)


def test_chunks_of_different_sizes_meet_on_a_unit_boundary():
    bounds = list(range(0, 3000, 300)) + [3000]  # tier chunks of 300, compute chunks of 512
    r = simulate(bounds, CHUNK, constant(1000), constant(1500))
    produced_once(r, bounds)
    assert r.report.split in bounds
    assert r.seconds <= 1.15 * harmonic_bound(3000, 1000, 1500)


def test_loading_far_too_slow_falls_back_to_compute():
    r = simulate(BOUNDS, CHUNK, constant(1000), constant(1000 / 20))
    produced_once(r)
    assert r.seconds <= N / 1000 * 1.01  # never slower than computing everything
    assert r.report.loaded_tokens == 0 and r.report.loads_cancelled == 1


def test_compute_far_too_slow_falls_back_to_loading_once_its_rate_is_known():
    rates = RateBook(Rate(value=1000 / 16), Rate(value=1000))  # from an earlier request
    r = simulate(BOUNDS, CHUNK, constant(1000 / 16), constant(1000), rates=rates)
    produced_once(r)
    assert r.report.computed_tokens == 0
    assert r.seconds == pytest.approx(N / 1000)


def test_without_any_prior_the_first_compute_chunk_is_the_only_cost():
    # Documented limit: with no measured rate at all, one compute chunk is issued blind.
    r = simulate(BOUNDS, CHUNK, constant(1000 / 16), constant(1000))
    produced_once(r)
    assert r.report.computed_tokens == CHUNK
    assert r.seconds <= max(CHUNK / (1000 / 16), N / 1000) * 1.01


def test_compute_slowing_under_load_shifts_the_split_toward_loading():
    fast = simulate(BOUNDS, CHUNK, constant(1000), constant(1000))
    # Other requests take the compute side's time from 0.5 s on: it runs at a quarter.
    slowed = simulate(BOUNDS, CHUNK, lambda n, t: n / (1000 if t < 0.5 else 250),
                      constant(1000))
    produced_once(slowed)
    assert slowed.report.split < fast.report.split
    # A chunk issued at the old rate cannot be recalled; it still beats loading everything
    # (compute-only would take 0.5 + 3596 / 250 = 14.9 s).
    assert slowed.seconds <= 0.9 * N / 1000


def test_loading_slowing_shifts_the_split_toward_compute():
    fast = simulate(BOUNDS, CHUNK, constant(1000), constant(1000))
    slowed = simulate(BOUNDS, CHUNK, constant(1000),
                      lambda n, t: n / (1000 if t < 0.5 else 200))
    produced_once(slowed)
    assert slowed.report.split > fast.report.split
    assert slowed.seconds < N / 1000  # still beats computing everything


def test_a_stalled_load_is_taken_over_and_nothing_waits_for_it():
    # The third unit's read never returns (a hung device).
    calls = []

    def load(n, t):
        calls.append(t)
        return math.inf if len(calls) == 3 else n / 1000

    r = simulate(BOUNDS, CHUNK, constant(1000), load)
    produced_once(r)
    assert r.report.loads_cancelled >= 1 and r.cancelled
    assert r.seconds <= N / 1000  # no worse than computing everything


def test_adversarial_load_fast_then_crawling():
    # Loading looks 8x faster for its first two units, then crawls at 1/20 of compute.
    calls = []

    def load(n, t):
        calls.append(t)
        return n / (8000 if len(calls) <= 2 else 50)

    r = simulate(BOUNDS, CHUNK, constant(1000), load)
    produced_once(r)
    assert r.seconds <= N / 1000 * 1.05


def test_a_load_failing_its_checksum_half_way_is_computed_never_served():
    bad = 12
    r = simulate(BOUNDS, CHUNK, constant(1000), constant(2000), load_ok=lambda j: j != bad)
    produced_once(r)
    assert bad not in r.loaded
    assert any(a <= BOUNDS[bad] < b for a, b in r.computed)
    assert r.report.loads_failed == 1
    assert r.seconds < N / 1000


def test_every_load_failing_degrades_to_compute_only():
    r = simulate(BOUNDS, CHUNK, constant(1000), constant(4000), load_ok=lambda j: False)
    produced_once(r)
    assert r.loaded == [] and r.report.computed_tokens == N
    assert r.seconds <= N / 1000 * 1.01


def test_planner_steps_by_hand():
    p = MeetPlanner([0, 100, 200, 300], 150, RateBook.empty(), 0.0)
    assert p.next_compute(0.0) == Span(0, 150)
    assert p.next_load(0.9) == 2  # the last unit first
    p.compute_done(Span(0, 150), 1.0)
    # Unit 1 is half computed: compute must finish it; loading it is no longer possible.
    step = p.next_compute(1.0)
    assert step == Span(150, 200)
    p.compute_done(step, 1.5)
    assert isinstance(p.next_compute(1.5), Wait)  # unit 2 is loading, not yet overdue
    p.load_done(2, True, 1.6)
    assert p.next_compute(1.6) is None and p.done()
    assert p.report.split == 200 and p.report.loaded_tokens == 100


def test_an_overdue_load_is_taken_over_by_hand():
    p = MeetPlanner([0, 100, 200], 100, RateBook.empty(), 0.0)
    assert p.next_compute(0.0) == Span(0, 100)
    assert p.next_load(0.0) == 1
    p.compute_done(Span(0, 100), 0.5)  # 200 tok/s: computing unit 1 takes 0.5 s
    assert isinstance(p.next_compute(0.5), Wait)  # the load might still land first
    # No load rate known; 1 s spent counts as 1 s to go: computing (0.5 s) wins by 1.25x.
    assert p.next_compute(1.0) == Span(100, 200, takes_over=1)
    p.load_done(1, True, 1.1)  # landed after the take-over: its bytes are never used
    assert p.report.loaded_tokens == 0 and p.report.loads_cancelled == 1
    p.compute_done(Span(100, 200, 1), 2.0)
    assert p.done() and p.report.split == 200
