"""Ratios of two code paths timed in the same process, interleaved round by round, so that
a busy neighbour on a shared machine slows both alike. Gates compare medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch


def interleaved_ratio(new: Callable[[], object], reference: Callable[[], object],
                      rounds: int = 15, warmup: int = 2) -> dict:
    """Median time of ``new`` over median time of ``reference``, alternating the two.

    Returns ``{"ratio", "new_s", "reference_s", "rounds"}`` (seconds are medians).
    """
    return interleaved_seconds(_timed(new), _timed(reference), rounds, warmup)


def interleaved_seconds(new: Callable[[], float], reference: Callable[[], float],
                        rounds: int, warmup: int = 0) -> dict:
    """As :func:`interleaved_ratio`, for callables that time themselves (return seconds),
    when only part of what they do is to be compared."""
    for _ in range(warmup):
        new(), reference()
    times_new, times_ref = [], []
    for i in range(rounds):
        # Alternate which one goes first, so neither always runs on a warmer cache.
        order = ((new, times_new), (reference, times_ref))
        for fn, sink in (order if i % 2 == 0 else order[::-1]):
            sink.append(fn())
    new_s, ref_s = statistics.median(times_new), statistics.median(times_ref)
    return {"ratio": new_s / ref_s, "new_s": new_s, "reference_s": ref_s, "rounds": rounds}


def _timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def gate(benchmark, name: str, measured: dict, max_ratio: float) -> None:
    """Record the ratio for the CI report and fail with a sentence naming it."""
    benchmark.extra_info.update(ratio_name=name, ratio=measured["ratio"], max_ratio=max_ratio,
                                new_median_s=measured["new_s"],
                                reference_median_s=measured["reference_s"])
    ratio = measured["ratio"]
    assert ratio <= max_ratio, (
        f"{name}: ratio {ratio:.3f} exceeds its bound {max_ratio} by "
        f"{(ratio / max_ratio - 1) * 100:.0f}% (new {measured['new_s'] * 1e3:.2f} ms, "
        f"reference {measured['reference_s'] * 1e3:.2f} ms, medians of {measured['rounds']})")



@pytest.fixture
def one_thread():
    """Time with one intra-op thread, so a shared machine's other load slows the two paths
    alike instead of starving one thread pool in the middle of a measurement."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
