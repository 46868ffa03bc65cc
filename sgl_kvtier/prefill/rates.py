"""Measured rates of the two ways to produce a prefix's KV: computing and loading.

Rates are tokens per second, learned online from the chunks themselves (no offline
profiling). A :class:`RateBook` keeps an exponentially weighted average across requests, so
the first decision of a new request already has a prior; each request refines it with the
chunks it times.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rate", "RateBook"]


@dataclass
class Rate:
    """An exponentially weighted tokens/s estimate; ``None`` until the first sample."""

    weight: float = 0.5  # of the newest sample: rates move with load on the machine
    value: float | None = None
    samples: int = 0

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        sample = tokens / max(seconds, 1e-9)
        self.value = sample if self.value is None else (
            self.weight * sample + (1 - self.weight) * self.value)
        self.samples += 1

    def seconds(self, tokens: float) -> float | None:
        """Predicted time for ``tokens``, or ``None`` while nothing was measured."""
        return None if self.value is None else tokens / self.value


@dataclass
class RateBook:
    """Compute and load rates carried from one request to the next."""

    compute: Rate
    load: Rate

    @classmethod
    def empty(cls) -> RateBook:
        return cls(Rate(), Rate())

    def copy(self) -> RateBook:
        return RateBook(Rate(self.compute.weight, self.compute.value),
                        Rate(self.load.weight, self.load.value))
