"""Write admission: which offered chunks are worth a disk write."""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["AdmissionPolicy", "AlwaysAdmit", "SecondHitAdmit", "make_admission"]


class AdmissionPolicy:
    """Decides, each time a chunk is offered to the store, whether to write it."""

    def admit(self, key: str) -> bool:
        raise NotImplementedError


class AlwaysAdmit(AdmissionPolicy):
    def admit(self, key: str) -> bool:
        return True


class SecondHitAdmit(AdmissionPolicy):
    """Admit a key on its second offer within the last ``window`` distinct refused keys.

    One-off prompts are then offered once, refused and forgotten, and never reach the
    disk. Only offers count, not lookups: a request looks its prefix up and then offers
    the chunks it computed, and counting both would admit every prompt on first sight.
    The history keeps 64 bits of each key, at most ``window`` of them, oldest dropped.
    """

    def __init__(self, window: int = 1 << 16) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        tag = int(key[:16], 16)
        with self._lock:
            if tag in self._seen:
                del self._seen[tag]
                return True
            self._seen[tag] = None
            if len(self._seen) > self.window:
                self._seen.popitem(last=False)
            return False


def make_admission(name: str, window: int = 1 << 16) -> AdmissionPolicy:
    """``"always"`` or ``"second_hit"`` (with a history of ``window`` keys)."""
    if name == "always":
        return AlwaysAdmit()
    if name == "second_hit":
        return SecondHitAdmit(window)
    raise ValueError(f"unknown admission policy {name!r} (use 'always' or 'second_hit')")
