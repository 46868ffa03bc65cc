"""Counters of a chunk store, busy-time clocks for bandwidth, and a rate-limited summary."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._log import logger

__all__ = ["Counters", "BusyClock", "SummaryLog"]


@dataclass
class Counters:
    """Monotonic event counts; ``add`` is the only writer."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    checksum_failures: int = 0  # payload did not match its checksum
    corrupt_files: int = 0  # bad header, wrong size, or a header naming another key
    quarantined: int = 0
    mismatches: int = 0  # intact chunk, but not the tokens or layout the caller asked for
    missing_files: int = 0  # indexed, but deleted behind the store's back
    evictions: int = 0
    admission_refusals: int = 0
    capacity_refusals: int = 0  # did not fit even after evicting every unpinned chunk
    write_drops: int = 0  # write queue full, or writes disabled
    write_errors: int = 0
    discovered: int = 0  # chunks another server sharing the folder wrote, found on lookup
    untrusted_files: int = 0  # symlinks, FIFOs, devices, other users' files: never read
    scan_errors: int = 0  # entries or shards the start-up scan could not list or remove

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dataclasses.asdict(self)


class BusyClock:
    """Seconds during which at least one operation was in flight.

    Bandwidth is bytes over this, not over the sum of per-thread times, which would
    divide the true rate by the number of overlapping reads.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self._total = 0.0

    def __enter__(self) -> BusyClock:
        with self._lock:
            if self._active == 0:
                self._since = self._clock()
            self._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._total += self._clock() - self._since

    @property
    def seconds(self) -> float:
        with self._lock:
            running = self._clock() - self._since if self._active else 0.0
            return self._total + running


# The counters whose change since the last summary means there was activity to report.
_ACTIVITY = ("hits", "misses", "bytes_written", "write_drops", "write_errors",
             "admission_refusals", "checksum_failures", "corrupt_files", "untrusted_files")


class SummaryLog:
    """At most one summary line per ``interval`` seconds, and only after some activity."""

    def __init__(self, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last_time = clock()
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def maybe_log(self, snapshot: Callable[[], dict[str, float]]) -> bool:
        """Log the change in ``snapshot()`` since the last line, if due; True if it did."""
        with self._lock:
            now = self._clock()
            if now - self._last_time < self.interval:
                return False
            stats = snapshot()
            delta = {k: stats[k] - self._last.get(k, 0) for k in (*_ACTIVITY, "bytes_read")}
            if not any(delta[k] for k in _ACTIVITY):
                return False
            elapsed = now - self._last_time
            self._last_time, self._last = now, {k: stats[k] for k in delta}
        logger.info(_summary_line(delta, stats, elapsed))
        return True


def _summary_line(delta: dict[str, float], stats: dict[str, float], seconds: float) -> str:
    gib = 1 << 30
    return (f"kv tier, last {seconds:.0f} s: {delta['hits']} hits, {delta['misses']} misses, "
            f"{delta['bytes_read'] / gib:.2f} GiB read, "
            f"{delta['bytes_written'] / gib:.2f} GiB written, "
            f"{delta['admission_refusals']} refused, {delta['write_drops']} dropped, "
            f"{delta['checksum_failures'] + delta['corrupt_files']} corrupt; "
            f"{stats['used_bytes'] / gib:.1f}/{stats['capacity_bytes'] / gib:.1f} GiB used, "
            f"read {stats['read_bandwidth'] / 1e9:.2f} GB/s")
