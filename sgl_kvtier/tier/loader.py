"""Disk hits read into KV slots on a loader thread, so the engine's scheduler never waits.

A :class:`LoadJob` is one hit: its chunks are read through the store's I/O threads,
``loads_in_flight`` ahead of the one being copied into the pool, front to back or back to
front. The engine submits a job, keeps scheduling other requests, and polls it; a job can
be cancelled between chunks and shows its progress per chunk. Jobs run one at a time (the
staging buffers are the loader's own), in submission order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ._log import logger
from .background import yield_cpu_to_serving

__all__ = ["LoadJob", "Loader"]


@dataclass(eq=False)
class LoadJob:
    """One disk hit on its way into ``slots``.

    ``order`` is ``"front"`` (first chunk first) or ``"back"`` (last chunk first: the order
    bidirectional prefill needs, loading the part compute reaches last).
    """

    hit: object  # a DiskHit
    slots: torch.Tensor  # (hit.length,) int64
    order: str = "front"
    chunks_done: int = 0  # chunks copied into the pool so far, in ``order``
    ok: bool | None = None  # None while running
    error: BaseException | None = None  # an unexpected error (a bug), not a bad chunk
    seconds: float = 0.0
    held: list[str] = field(default_factory=list)  # chunk keys kept from eviction meanwhile
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def chunks(self) -> int:
        return len(self.hit.keys)

    def order_of_chunks(self) -> list[int]:
        ids = list(range(self.chunks))
        return ids if self.order == "front" else ids[::-1]

    def cancel(self) -> None:
        """Stop after the chunk being copied; the job then ends with ``ok = False``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True only if every chunk landed and verified."""
        self._done.wait(timeout)
        return bool(self.ok)


# (job, chunk index, staging buffer) -> future of the verified payload or None
Submit = Callable[[LoadJob, int, torch.Tensor], Future]
# (job, chunk index, payload) -> None: copies one chunk into the job's slots
Unpack = Callable[[LoadJob, int, torch.Tensor], None]
# (job) -> None: counters and the one log line of a failed hit
Finish = Callable[[LoadJob], None]


class Loader:
    """The thread that runs :class:`LoadJob` s (one :class:`TierService` owns one)."""

    def __init__(self, staging: list[torch.Tensor], submit: Submit, unpack: Unpack,
                 finish: Finish) -> None:
        self._staging, self._submit, self._unpack, self._finish = staging, submit, unpack, finish
        self._jobs: queue.SimpleQueue[LoadJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kvtier-load", daemon=True)
        self._thread.start()

    def submit(self, job: LoadJob) -> LoadJob:
        self._jobs.put(job)
        return job

    def close(self, timeout: float | None = None) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        yield_cpu_to_serving()
        while (job := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                job.ok = not job.cancelled and self._run(job)
            except Exception as e:  # a bug: the engine switches the tier off
                job.ok, job.error = False, e
                logger.exception("kv tier: loading a disk hit failed unexpectedly")
            finally:
                job.seconds = time.perf_counter() - start
                self._finish(job)
                job._done.set()

    def _run(self, job: LoadJob) -> bool:
        order = job.order_of_chunks()
        pending: deque[tuple[int, Future]] = deque()
        queued, ok = 0, True
        try:
            while ok and (pending or queued < len(order)):
                while queued < len(order) and len(pending) < len(self._staging):
                    buf = self._staging[queued % len(self._staging)]
                    pending.append((order[queued], self._submit(job, order[queued], buf)))
                    queued += 1
                i, future = pending.popleft()
                payload = future.result()
                if payload is None or job.cancelled:
                    ok = False
                    break
                self._unpack(job, i, payload)
                job.chunks_done += 1
        finally:
            for _, future in pending:  # let the staging buffers go idle before reuse
                future.result()
        return ok
