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

    With ``pick`` set, the job asks it for each next chunk instead (``None``: no more), and
    reports every chunk to ``landed(i, ok, seconds)`` (``seconds``: since the chunk before
    landed); ``depth()`` says how many reads may run at once (default one, overlapping the
    copy of the chunk before). A bad chunk then does not end the job: the caller computes
    those tokens instead.
    """

    hit: object  # a DiskHit
    slots: torch.Tensor  # (hit.length,) int64
    order: str = "front"
    chunks_done: int = 0  # chunks copied into the pool so far, in ``order``
    ok: bool | None = None  # None while running
    error: BaseException | None = None  # an unexpected error (a bug), not a bad chunk
    seconds: float = 0.0
    held: list[str] = field(default_factory=list)  # chunk keys kept from eviction meanwhile
    pick: Callable[[], int | None] | None = None
    landed: Callable[[int, bool, float], None] | None = None
    depth: Callable[[], int] | None = None  # reads in flight wanted now (picked mode)
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
        if job.pick is not None:
            return self._run_picked(job)
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

    def _run_picked(self, job: LoadJob) -> bool:
        # Reads for the next chunks start once this one's read is done, while it is copied
        # into the pool; how many run at once is the caller's ``depth`` (one while compute
        # runs beside the loads: the planner's view of what is loading, and since when,
        # stays the disk's).
        pending: deque[tuple[int, Future, torch.Tensor]] = deque()
        free = deque(self._staging)
        last, more = time.perf_counter(), True
        try:
            more = self._pick_more(job, pending, free)
            while pending:
                i, future, buf = pending.popleft()
                payload = future.result()
                more = more and self._pick_more(job, pending, free)
                ok = payload is not None and not job.cancelled
                if ok:
                    self._unpack(job, i, payload)
                    job.chunks_done += 1
                free.append(buf)
                now = time.perf_counter()
                job.landed(i, ok, now - last)  # in steady state: the time per chunk
                last = now
        finally:
            for _, future, _ in pending:  # an error: let the staging buffers go idle first
                future.result()
        return not job.cancelled

    def _pick_more(self, job: LoadJob, pending: deque, free: deque) -> bool:
        """Start reads up to the job's depth; False once it wants no more."""
        depth = job.depth() if job.depth is not None else 1
        while len(pending) < max(depth, 1) and free:
            if job.cancelled or (i := job.pick()) is None:
                return False
            buf = free.popleft()
            pending.append((i, self._submit(job, i, buf), buf))
        return True
