"""In-memory index of the chunks on disk, in least-recently-used order, with read pins."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["ChunkIndex"]


class ChunkIndex:
    """Key -> file size, oldest access first; thread-safe.

    A pinned key is being read and is never chosen for eviction. Removing a pinned key
    (it was found corrupt or missing) is allowed; its pins are then simply dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def add(self, key: str, size: int) -> None:
        """Record ``key`` as the most recently used chunk, taking ``size`` bytes on disk."""
        with self._lock:
            self._bytes += size - self._sizes.pop(key, 0)
            self._sizes[key] = size

    def remove(self, key: str) -> bool:
        """Forget ``key``; False if it was not indexed."""
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is None:
                return False
            self._bytes -= size
            return True

    def prefix_length(self, keys: Iterable[str]) -> int:
        """How many of ``keys``, from the first, are indexed."""
        with self._lock:
            count = 0
            for key in keys:
                if key not in self._sizes:
                    break
                count += 1
            return count

    def pin(self, key: str) -> bool:
        """Mark ``key`` as being read and most recently used; False if it is not indexed."""
        with self._lock:
            if key not in self._sizes:
                return False
            self._sizes.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins.pop(key, 0) - 1
            if left > 0:
                self._pins[key] = left

    def evict_for(self, nbytes: int, capacity: int) -> list[str] | None:
        """Remove least-recently-used unpinned keys until ``nbytes`` more fit in ``capacity``.

        Returns the removed keys (whose files the caller deletes), or None, removing
        nothing, when even evicting every unpinned chunk would not make room.
        """
        with self._lock:
            excess = self._bytes + nbytes - capacity
            victims = []
            for key, size in self._sizes.items():
                if excess <= 0:
                    break
                if key not in self._pins:
                    victims.append(key)
                    excess -= size
            if excess > 0:
                return None
            for key in victims:
                self._bytes -= self._sizes.pop(key)
            return victims

    def remove_unpinned(self) -> list[str]:
        """Remove every key not being read; returns them (the caller deletes the files)."""
        with self._lock:
            victims = [key for key in self._sizes if key not in self._pins]
            for key in victims:
                self._bytes -= self._sizes.pop(key)
            return victims
