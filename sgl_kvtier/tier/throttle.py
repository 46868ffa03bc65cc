"""A token bucket that caps the bytes per second all of a store's read threads may read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Rate limiter shared by threads: ``acquire(n)`` returns once ``n`` bytes fit the rate.

    Callers reserve their bytes under the lock and then sleep off any debt outside it, so
    concurrent readers queue in arrival order and a request larger than the burst still
    passes (it just waits longer). Over any interval the bytes granted are at most
    ``rate * seconds + burst``.

    Parameters
    ----------
    rate
        Bytes per second.
    burst
        Bytes that may pass at once after an idle period; defaults to 50 ms at ``rate``.
    clock, sleep
        Time source and sleeper, replaceable in tests.
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate * 0.05)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def acquire(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket, sleeping if it is in debt; returns seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
