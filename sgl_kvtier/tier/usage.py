"""Bytes used in a tier folder that several servers share, kept under one lock.

Servers of the same model on one machine (data-parallel replicas, or two servers) may
point at the same folder. Chunk files are immutable and named by their key, so sharing
reads needs nothing; sharing a capacity does. Every server commits, evicts and
quarantines under an exclusive ``flock`` on ``LOCK`` and keeps the folder's total in
``USAGE`` (16 bytes: a magic and a little-endian count, checked on read). A missing or
garbled count reads as unknown, and the caller recounts the folder under the lock.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .tier_dir import TierDir

__all__ = ["SharedUsage", "Usage", "LOCK_FILE", "USAGE_FILE"]

LOCK_FILE, USAGE_FILE = "LOCK", "USAGE"
_RECORD = struct.Struct("<8sQ")
_MAGIC = b"KVTUSE1\0"


@dataclass
class Usage:
    """The folder's bytes as read under the lock; ``None`` when unknown (recount)."""

    bytes: int | None


class SharedUsage:
    """The ``LOCK`` and ``USAGE`` files of one tier folder.

    The ``flock`` orders processes; a thread lock orders this process's threads (an
    ``flock`` held through one descriptor does not exclude other threads using it).
    """

    def __init__(self, folder: TierDir) -> None:
        self._lock_fd = folder.open_control(LOCK_FILE)
        try:
            self._fd = folder.open_control(USAGE_FILE)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._threads = threading.Lock()

    @contextmanager
    def locked(self) -> Iterator[Usage]:
        """Hold the folder's lock; what the caller leaves in ``Usage.bytes`` is saved."""
        with self._threads:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                usage = Usage(self._read())
                before = usage.bytes
                yield usage
                if usage.bytes is not None and usage.bytes != before:
                    os.pwrite(self._fd, _RECORD.pack(_MAGIC, max(usage.bytes, 0)), 0)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read(self) -> int | None:
        data = os.pread(self._fd, _RECORD.size, 0)
        if len(data) != _RECORD.size:
            return None
        magic, value = _RECORD.unpack(data)
        return value if magic == _MAGIC else None

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            os.close(fd)
