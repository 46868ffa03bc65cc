"""The tier's logger, and a guard that keeps a repeated problem to one line per process."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("sgl_kvtier")

_seen: set[str] = set()
_seen_lock = threading.Lock()


def log_once(topic: str, level: int, message: str, *args: object) -> bool:
    """Log ``message`` the first time ``topic`` comes up in this process; True if it did."""
    with _seen_lock:
        if topic in _seen:
            return False
        _seen.add(topic)
    logger.log(level, message, *args)
    return True


def forget_logged() -> None:
    """Let every topic log again (for tests)."""
    with _seen_lock:
        _seen.clear()
