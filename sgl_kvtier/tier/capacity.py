"""A capacity that holds across every server sharing one tier folder.

Each server indexes what it has seen (its own writes, its start-up scan, chunks it found
on disk while looking prompts up) in least-recently-used order. The folder's total lives
in the shared ``USAGE`` file (see :mod:`.usage`); a commit that would pass the capacity
first evicts, under the shared lock:

1. this server's least recently used chunks, skipping any whose modification time moved
   since this server last saw it: loads and writes set it, so another server used that
   chunk since, and it is fresh there (it moves to this server's most recent end);
2. if that is not enough, everything on disk, rescanned and ordered by modification time
   (chunks other servers wrote and this one never saw), and the total is recounted.

No server deletes a chunk another server touched after this one last did.
"""

from __future__ import annotations

from .index import ChunkIndex
from .keys import CHUNK_SUFFIX, is_chunk_name
from .recovery import disk_bytes, trusted_file
from .stats import Counters
from .tier_dir import TierDir
from .usage import Usage

__all__ = ["Capacity"]


class Capacity:
    """Eviction and accounting of one store, over its folder, index and counters."""

    def __init__(self, folder: TierDir, index: ChunkIndex, counters: Counters,
                 capacity_bytes: int) -> None:
        self.folder, self.index, self.counters = folder, index, counters
        self.capacity_bytes = capacity_bytes

    def make_room(self, usage: Usage, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit; False, having evicted what it could, if they
        cannot. Call under the shared lock, with ``usage.bytes`` known."""
        if nbytes > self.capacity_bytes:
            return False
        if usage.bytes + nbytes <= self.capacity_bytes:
            return True
        for rescan in (False, True):
            if rescan:
                usage.bytes = self.rescan()
            if self._evict_lru(usage, usage.bytes + nbytes - self.capacity_bytes):
                return True
        return False

    def _evict_lru(self, usage: Usage, excess: int) -> bool:
        for key, _, seen_mtime in self.index.oldest_unpinned():
            if excess <= 0:
                break
            st = self.folder.stat_chunk(key)
            if st is None:  # deleted by another server (which counted it) or untrusted
                self.index.remove(key)
                continue
            if st.st_mtime_ns != seen_mtime:  # used by another server since: fresh there
                self.index.touch(key, st.st_mtime_ns)
                continue
            if self.index.remove_unpinned(key) and self.folder.remove(key):
                size = disk_bytes(st)
                excess -= size
                usage.bytes -= size
                self.counters.add(evictions=1)
        return excess <= 0

    def rescan(self) -> int:
        """Index every trusted chunk file on disk, oldest modification first (pins and
        this server's own entries are kept); returns the folder's total bytes."""
        found: list[tuple[int, str, int]] = []
        shards, _ = self.folder.shards()
        for shard in shards:
            try:
                entries = self.folder.entries(shard, want_stat=is_chunk_name)
            except OSError:
                continue
            found += [(st.st_mtime_ns, name.removesuffix(CHUNK_SUFFIX), disk_bytes(st))
                      for name, _, st in entries
                      if st is not None and name[:2] == shard and trusted_file(st)]
        found.sort()
        self.index.replace_all((key, size, mtime) for mtime, key, size in found)
        return sum(size for _, _, size in found)

    def discover(self, key: str) -> bool:
        """Index ``key`` if another server has written it since this one looked; True if
        it is now indexed. One ``stat``, no read: the header is verified at load."""
        st = self.folder.stat_chunk(key)
        if st is None:
            return False
        self.index.add(key, disk_bytes(st), st.st_mtime_ns)
        self.counters.add(discovered=1)
        return True
