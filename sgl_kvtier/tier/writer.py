"""The background writer: one thread, a byte-bounded queue, reads first, errors contained.

A write error (disk full, read-only or vanished directory) turns writing off: the store
carries on read-only, logs one line, and lets one write through every ``retry_interval``
seconds to find out whether the problem has gone. Any other exception is a bug: writing
stops for good (``broken``), with one line and its traceback.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ._log import logger
from .background import yield_cpu_to_serving
from .layout import ChunkLayout
from .stats import Counters

__all__ = ["WriteJob", "ReadGate", "BackgroundWriter"]


@dataclass
class WriteJob:
    key: str
    token_digest: bytes
    layout: ChunkLayout
    payload: np.ndarray  # (layout.nbytes,) uint8, owned by the store until written


class ReadGate:
    """Counts reads in flight so the writer can step aside for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    def wait_idle(self, max_wait: float) -> None:
        """Return when no read is in flight, or after ``max_wait`` seconds (no starvation)."""
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, max_wait)


class BackgroundWriter:
    """Runs ``commit(job)`` for queued jobs on one daemon thread, oldest first.

    Parameters
    ----------
    commit
        Writes one job to disk; any exception it raises turns writing off.
    counters
        Where drops and errors are counted.
    max_queued_bytes
        Payload bytes that may wait; a job that would exceed it is dropped.
    retry_interval
        Seconds between write attempts while writing is off.
    """

    def __init__(self, commit: Callable[[WriteJob], None], counters: Counters,
                 max_queued_bytes: int, retry_interval: float = 60.0) -> None:
        self._commit, self._counters = commit, counters
        self.max_queued_bytes, self.retry_interval = max_queued_bytes, retry_interval
        self._cond = threading.Condition()
        self._jobs: OrderedDict[str, WriteJob] = OrderedDict()
        self._queued_bytes = 0
        self._busy = False
        self._closing = False
        self._failed_at: float | None = None  # set while writing is off
        self.broken: Exception | None = None  # a bug in a write: no retries
        self._thread = threading.Thread(target=self._run, name="kvtier-writer", daemon=True)
        self._thread.start()

    @property
    def writable(self) -> bool:
        """False while writing is off and no retry is due yet, or for good once broken."""
        failed = self._failed_at
        if self.broken is not None:
            return False
        return failed is None or time.monotonic() - failed >= self.retry_interval

    @property
    def busy(self) -> bool:
        """True while a job is being written."""
        return self._busy

    @property
    def failed(self) -> bool:
        """True from a write error until a write succeeds again."""
        return self._failed_at is not None

    @property
    def queued(self) -> tuple[int, int]:
        """(jobs, payload bytes) waiting, not counting the one being written."""
        with self._cond:
            return len(self._jobs), self._queued_bytes

    def is_pending(self, key: str) -> bool:
        return key in self._jobs

    def submit(self, job: WriteJob) -> bool:
        """Queue ``job`` unless writing is off, the queue is full, or it is already queued."""
        with self._cond:
            if job.key in self._jobs:
                return True
            nbytes = len(job.payload)
            if (self._closing or not self.writable
                    or self._queued_bytes + nbytes > self.max_queued_bytes):
                self._counters.add(write_drops=1)
                return False
            self._jobs[job.key] = job
            self._queued_bytes += nbytes
            self._cond.notify_all()
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is written or dropped; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs (up to ``timeout``), drop the rest, stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        self._counters.add(write_drops=dropped)
        self._thread.join(timeout)

    def _next(self) -> WriteJob | None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._jobs or self._closing)
            if self._closing:
                return None
            _, job = self._jobs.popitem(last=False)
            self._queued_bytes -= len(job.payload)
            self._busy = True
            return job

    def _run(self) -> None:
        yield_cpu_to_serving()
        while (job := self._next()) is not None:
            if not self.writable:
                self._counters.add(write_drops=1)
                continue
            try:
                self._commit(job)
            except OSError as e:
                self.turn_off(e)
            except Exception as e:  # a bug: must leave serving untouched, never retried
                self.broken = e
                self.turn_off(e)
            else:
                self._turn_on()

    def turn_off(self, error: Exception) -> None:
        """Count ``error`` and stop writing until the next retry; logs the first time."""
        self._counters.add(write_errors=1)
        if self._failed_at is None:
            if self.broken is not None:
                logger.error("kv tier: a write failed unexpectedly (%r); no more writes, "
                             "reads go on", error, exc_info=error)
            else:
                logger.warning("kv tier: write failed (%s); continuing read-only, retrying a "
                               "write every %.0f s", error, self.retry_interval)
        self._failed_at = time.monotonic()

    def _turn_on(self) -> None:
        if self._failed_at is not None:
            self._failed_at = None
            logger.warning("kv tier: writes work again; leaving read-only mode")
