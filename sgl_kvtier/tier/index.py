"""In-memory index of the chunks on disk, in least-recently-used order, with read pins."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["ChunkIndex"]


class ChunkIndex:
    """Key -> (bytes on disk, modification time in ns), oldest access first; thread-safe.

    The modification time is what this process last saw on disk: loads and writes set it,
    so a file whose time moved on was used by another server sharing the folder. A pinned
    key is being read and is never chosen for eviction. Removing a pinned key (it was
    found corrupt or missing) is allowed; its pins are then simply dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def add(self, key: str, size: int, mtime_ns: int = 0) -> None:
        """Record ``key`` as the most recently used chunk, taking ``size`` bytes on disk."""
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += size - (old[0] if old else 0)
            self._entries[key] = (size, mtime_ns)

    def touch(self, key: str, mtime_ns: int) -> None:
        """``key`` was just used (here or by another server): most recent, new time."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = (entry[0], mtime_ns)
                self._entries.move_to_end(key)

    def remove(self, key: str) -> int:
        """Forget ``key``; returns the bytes it was recorded with (0 if not indexed)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return 0
            self._bytes -= entry[0]
            return entry[0]

    def remove_unpinned(self, key: str) -> int:
        """:meth:`remove`, unless ``key`` is being read right now (then 0)."""
        with self._lock:
            if key in self._pins:
                return 0
        return self.remove(key)

    def prefix_length(self, keys: Iterable[str]) -> int:
        """How many of ``keys``, from the first, are indexed."""
        with self._lock:
            count = 0
            for key in keys:
                if key not in self._entries:
                    break
                count += 1
            return count

    def pin(self, key: str) -> bool:
        """Mark ``key`` as being read and most recently used; False if it is not indexed."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins.pop(key, 0) - 1
            if left > 0:
                self._pins[key] = left

    def oldest_unpinned(self) -> list[tuple[str, int, int]]:
        """``(key, bytes, mtime_ns)`` of every unpinned chunk, least recently used first."""
        with self._lock:
            return [(key, size, mtime) for key, (size, mtime) in self._entries.items()
                    if key not in self._pins]

    def unpinned_keys(self) -> list[str]:
        with self._lock:
            return [key for key in self._entries if key not in self._pins]

    def replace_all(self, entries: Iterable[tuple[str, int, int]]) -> None:
        """Reset to ``(key, bytes, mtime_ns)`` entries given oldest first (a rescan);
        pins are kept."""
        with self._lock:
            self._entries = OrderedDict((key, (size, mtime)) for key, size, mtime in entries)
            self._bytes = sum(size for size, _ in self._entries.values())
