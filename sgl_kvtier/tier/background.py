"""Background threads that never compete with serving for the CPU."""

from __future__ import annotations

import os
import threading

__all__ = ["yield_cpu_to_serving"]

LOWEST = 19


def yield_cpu_to_serving() -> None:
    """Give the calling thread the lowest CPU priority (Linux: niceness is per thread).

    Writes are not urgent; a prefill is. On a small machine a busy copy or checksum thread
    slows the model's OpenMP threads far more than its own CPU time, because each parallel
    region waits for its slowest thread (measured on 2 cores: a 189 MB write-through made a
    concurrent 2k-token prefill 1.24x slower at normal priority).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the thread keeps its priority
