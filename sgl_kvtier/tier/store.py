"""ChunkStore: KV chunks in files under one folder, with an index, a capacity and a writer.

Guarantees, whatever the disk (or anyone with access to it) does:

* A load returns the bytes that were put under that key, or ``None``: every payload is
  checksummed on every load, and the header must name the key (and, when given, the
  tokens and layout) the caller asked for.
* Nothing outside the folder is ever touched, and nothing in it is trusted: see
  :mod:`.tier_dir` (no symlinks followed, regular files of this user only).
* I/O errors never reach the caller: reads turn into misses, write errors into read-only
  mode (one log line).
* Only renamed files are chunks, so a crash mid-write leaves nothing readable behind.
* Several stores (servers) may share one folder: chunk files are immutable and named by
  their key, so each finds the others' chunks on disk, and the capacity holds across
  them (see :mod:`.capacity`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import faults
from ._log import log_once, logger
from .admission import make_admission
from .capacity import Capacity
from .chunk_file import ChecksumMismatch, CorruptChunk, file_size
from .chunk_io import ChunkMismatch, read_chunk, write_chunk
from .config import StoreConfig
from .direct_io import BLOCK, IOMode, alloc_aligned, as_byte_array
from .index import ChunkIndex
from .keys import TokenIds, check_key, token_digest
from .layout import ChunkLayout
from .recovery import ScanResult, disk_bytes, scan
from .stats import BusyClock, Counters, SummaryLog
from .throttle import TokenBucket
from .tier_dir import TierDir, UntrustedEntry, UntrustedRoot
from .usage import SharedUsage
from .writer import BackgroundWriter, ReadGate, WriteJob

__all__ = ["ChunkStore", "Destination", "UntrustedRoot"]

Destination = torch.Tensor | np.ndarray | bytearray | memoryview


class ChunkStore:
    """Disk tier of KV chunks addressed by :func:`~sgl_kvtier.tier.keys.chunk_keys` keys.

    Opening rebuilds the index from the files' headers. ``put`` is asynchronous; ``load``
    reads a batch on ``read_threads`` threads, ahead of any write in progress. A folder
    that cannot be created or scanned leaves the store read-only (one log line).

    Raises
    ------
    UntrustedRoot
        If the folder is a symlink, or it or its parent belongs to another user.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.root = Path(config.root).expanduser().absolute()
        self.counters = Counters()
        self._mode = IOMode(config.direct_io)
        self._index = ChunkIndex()
        self._admission = make_admission(config.admission, config.admission_window)
        limit = config.read_bandwidth_limit
        self._throttle = TokenBucket(limit) if limit is not None else None
        self._gate, self._read_clock, self._write_clock = ReadGate(), BusyClock(), BusyClock()
        self._summary = SummaryLog(config.summary_interval)
        self._staging = alloc_aligned(BLOCK, pin=False).numpy()  # the writer thread's
        self._closed = False
        self._dir: TierDir | None = None
        self._usage: SharedUsage | None = None
        self._capacity: Capacity | None = None
        problem = self._open_folder()
        self.scan = ScanResult()
        if problem is None:
            problem = self._rebuild()
        self._pool = ThreadPoolExecutor(config.read_threads, thread_name_prefix="kvtier-read")
        self._writer = BackgroundWriter(self._commit, self.counters,
                                        config.max_queued_write_bytes,
                                        config.write_retry_interval)
        if problem is not None:
            self._writer.turn_off(problem)

    @property
    def broken(self) -> Exception | None:
        """An unexpected error (a bug, not the disk) that stopped the writer for good."""
        return self._writer.broken

    # ------------------------------------------------------------------ lookups and loads

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (queued writes do not count).

        Keys this store has not indexed are looked for on disk (one ``stat``), so chunks
        written by another server sharing the folder are found."""
        found = self._index.prefix_length(keys)
        while (found < len(keys) and self._capacity is not None and not self._closed
               and self._capacity.discover(check_key(keys[found]))):
            found += 1
        return found

    def hold(self, keys: Sequence[str]) -> list[str]:
        """Keep ``keys`` from eviction (and mark them most recently used) until
        :meth:`release`: a hit found now is read later, on the loader thread. Returns the
        keys held (those indexed)."""
        return [key for key in keys if self._index.pin(check_key(key))]

    def release(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._index.unpin(key)

    def load(self, keys: Sequence[str], token_ids: Sequence[TokenIds] | None = None,
             layout: ChunkLayout | None = None,
             out: Sequence[Destination | None] | None = None) -> list[torch.Tensor | None]:
        """Read chunks in parallel; blocking form of :meth:`submit_load`."""
        return [f.result() for f in self.submit_load(keys, token_ids, layout, out)]

    def submit_load(self, keys: Sequence[str], token_ids: Sequence[TokenIds] | None = None,
                    layout: ChunkLayout | None = None,
                    out: Sequence[Destination | None] | None = None) -> list[Future]:
        """Start reading ``keys``; each future gives the payload or ``None`` (a miss).

        Parameters
        ----------
        keys
            Chunk keys; reads start in this order, ``read_threads`` at a time.
        token_ids
            Per key, the chunk's ``(tokens,)`` ids; a chunk stored for other tokens is a miss.
        layout
            Expected layout of every chunk; a chunk with another layout is a miss.
        out
            Per key, a CPU destination at least the payload long (a uint8 tensor from
            :func:`alloc_aligned` reads with no copy), or ``None`` for a new tensor.

        Returns
        -------
        list[Future]
            Per key, resolving to a ``(payload_len,)`` uint8 tensor (a view of ``out[i]``
            when given) or ``None``. A destination shorter than the payload raises
            ``ValueError`` from its future.
        """
        futures = []
        for i, key in enumerate(keys):
            digest = token_digest(token_ids[i]) if token_ids is not None else None
            dst = out[i] if out is not None else None
            if self._closed or self._dir is None or not self._index.pin(check_key(key)):
                self.counters.add(misses=1)
                futures.append(_done(None))
                continue
            try:
                futures.append(self._pool.submit(self._load_pinned, key, digest, layout, dst))
            except RuntimeError:  # the interpreter is exiting (the engine died): a miss
                self._index.unpin(key)
                self.counters.add(misses=1)
                futures.append(_done(None))
        return futures

    def _load_pinned(self, key: str, digest: bytes | None, layout: ChunkLayout | None,
                     dst: Destination | None) -> torch.Tensor | None:
        try:
            with self._gate.reading(), self._read_clock:
                with self._dir.open_chunk(key, self._mode) as f:
                    payload = read_chunk(f, key, lambda n: _destination(dst, n),
                                         token_digest=digest, layout=layout,
                                         throttle=self._throttle)
                    os.utime(f.fd)  # the shared recency of this chunk (see capacity)
                    self._index.touch(key, os.fstat(f.fd).st_mtime_ns)
        except FileNotFoundError:
            self._index.remove(key)
            self.counters.add(misses=1, missing_files=1)
        except UntrustedEntry as e:
            self._index.remove(key)
            self.counters.add(misses=1, untrusted_files=1)
            log_once("untrusted", logging.WARNING, "kv tier: not reading %s (later ones are "
                     "only counted)", e.strerror)
        except ChunkMismatch as e:
            self.counters.add(misses=1, mismatches=1)
            log_once("mismatch", logging.WARNING, "kv tier: chunk %s holds other %s than asked "
                     "for; treated as a miss (later ones are only counted)", key, e)
        except CorruptChunk as e:
            self._discard(key, e)
        except OSError as e:
            # An unreadable file is as good as a corrupt one, and would fail again.
            self._discard(key, CorruptChunk(f"read failed: {e}"))
        else:
            self.counters.add(hits=1, bytes_read=len(payload))
            if isinstance(dst, torch.Tensor):
                return dst.reshape(-1).view(torch.uint8)[:len(payload)]
            return torch.from_numpy(payload)
        finally:
            self._index.unpin(key)
        return None

    def _discard(self, key: str, error: CorruptChunk) -> None:
        self._index.remove(key)
        with self._usage.locked() as usage:
            st = self._dir.stat_chunk(key)
            moved = self._dir.quarantine(key, str(error))
            if moved and st is not None and usage.bytes is not None:
                usage.bytes -= disk_bytes(st)
        kind = "checksum_failures" if isinstance(error, ChecksumMismatch) else "corrupt_files"
        self.counters.add(misses=1, quarantined=int(moved), **{kind: 1})

    # ------------------------------------------------------------------------- writes

    def admit(self, key: str) -> bool:
        """Whether a chunk is worth packing and offering with ``put(..., admitted=True)``:
        not stored, not queued, writes possible, and the admission policy says yes (this
        call counts as the offer). Lets a caller skip copying KV the store would refuse."""
        check_key(key)
        if self._closed or key in self._index or self._writer.is_pending(key):
            return False
        if not self._writer.writable:
            self.counters.add(write_drops=1)
            return False
        if not self._admission.admit(key):
            self.counters.add(admission_refusals=1)
            return False
        return True

    def put(self, key: str, token_ids: TokenIds | None, payload: torch.Tensor,
            layout: ChunkLayout, admitted: bool = False) -> bool:
        """Offer a chunk for writing; returns at once, True if stored or queued.

        Parameters
        ----------
        key
            The chunk's key from :func:`~sgl_kvtier.tier.keys.chunk_keys`.
        token_ids
            ``(layout.tokens,)`` token ids of this chunk alone, or ``None`` when the key
            itself is the only name of the content (HiCache's page hashes).
        payload
            Contiguous CPU tensor of ``layout.nbytes`` bytes, packed as ``layout.shape``.
            The store keeps a reference until it is written: do not modify it afterwards.
        layout
            Shape and dtype of the payload, recorded in the file header.
        admitted
            True when :meth:`admit` already said yes for this key (not asked twice).
        """
        check_key(key)
        data = as_byte_array(payload)
        tokens = layout.tokens if token_ids is None else len(token_ids)
        if len(data) != layout.nbytes or tokens != layout.tokens:
            raise ValueError(f"payload of {len(data)} bytes and {tokens} tokens do not "
                             f"match {layout}")
        if self._closed:
            return False
        if key in self._index or self._writer.is_pending(key):
            return True
        if not admitted and not self._admission.admit(key):
            self.counters.add(admission_refusals=1)
            return False
        digest = bytes(32) if token_ids is None else token_digest(token_ids)
        return self._writer.submit(WriteJob(key, digest, layout, data))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued writes to finish; False if ``timeout`` seconds passed first."""
        return self._writer.flush(timeout)

    def _commit(self, job: WriteJob) -> None:
        """Write one chunk (on the writer thread); raises on any I/O error."""
        faults.hit("write")
        if self._dir is None:
            raise OSError(f"the tier folder {self.root} is not open")
        if job.key in self._index or self._capacity.discover(job.key):
            return  # another server sharing the folder wrote it
        if file_size(len(job.payload)) > self.config.capacity_bytes:
            self.counters.add(capacity_refusals=1)
            return
        with self._write_clock:
            written = write_chunk(self._dir, job.key, job.token_digest, job.layout,
                                  job.payload, self._mode, self._staging,
                                  lambda tmp: self._publish(job.key, tmp, len(job.payload)),
                                  fsync=self.config.fsync, pause=self._between_blocks)
        if written:
            self.counters.add(bytes_written=len(job.payload), chunks_written=1)

    def _publish(self, key: str, tmp: str, payload_len: int) -> bool:
        """Make room and rename ``tmp`` into place, under the folder's shared lock."""
        with self._usage.locked() as usage:
            if usage.bytes is None:  # first server here, or a damaged count: recount
                usage.bytes = self._capacity.rescan()
            if not self._capacity.make_room(usage, file_size(payload_len)):
                self.counters.add(capacity_refusals=1)
                return False
            if not self._dir.publish(key, tmp, fsync=self.config.fsync):
                return False
            st = self._dir.stat_chunk(key)
            size = disk_bytes(st) if st is not None else file_size(payload_len)
            usage.bytes += size
        self._index.add(key, size, st.st_mtime_ns if st is not None else 0)
        return True

    def _between_blocks(self) -> None:
        faults.hit("block")
        self._gate.wait_idle(self.config.reads_first_max_wait)

    def clear(self) -> int:
        """Delete every chunk this store indexed that is not being read right now;
        returns how many were deleted."""
        if self._dir is None:
            return 0
        deleted = 0
        with self._usage.locked() as usage:
            for key in self._index.unpinned_keys():
                st = self._dir.stat_chunk(key)
                if self._index.remove_unpinned(key) and self._dir.remove(key):
                    deleted += 1
                    if st is not None and usage.bytes is not None:
                        usage.bytes -= disk_bytes(st)
        return deleted

    # --------------------------------------------------------------- open, stats, close

    def _open_folder(self) -> OSError | None:
        """Open the folder and its shared lock; the error that makes this store
        read-only, if any. ``UntrustedRoot`` is raised: such a folder is refused."""
        try:
            self._dir = TierDir(self.root)
            self._usage = SharedUsage(self._dir)
        except UntrustedRoot:
            raise
        except OSError as e:
            if self._dir is not None:
                self._dir.close()
                self._dir = None
            return e
        self.root = self._dir.root
        self._capacity = Capacity(self._dir, self._index, self.counters,
                                  self.config.capacity_bytes)
        return None

    def _rebuild(self) -> OSError | None:
        """Index the folder's chunks; the error that makes this store read-only, if any."""
        try:
            with self._usage.locked() as usage:
                self.scan = scan(self._dir, self._mode)
                for key, size, mtime in self.scan.chunks:
                    self._index.add(key, size, mtime)
                usage.bytes = self._index.total_bytes
                # The capacity may have shrunk since the last run.
                self._capacity.make_room(usage, 0)
        except OSError as e:
            log_once("scan", logging.WARNING, "kv tier: cannot scan %s (%s); continuing "
                     "read-only with what lookups find on disk", self.root, e)
            self.scan = ScanResult()
            return e
        self.counters.add(corrupt_files=self.scan.corrupt, quarantined=self.scan.corrupt,
                          untrusted_files=self.scan.untrusted, scan_errors=self.scan.errors)
        logger.info("kv tier: %d chunks (%.2f GiB) in %s; index rebuilt in %.2f s, %d bad files "
                    "quarantined, %d temporary files removed, %d untrusted entries skipped",
                    len(self._index), self._index.total_bytes / 2**30, self.root,
                    self.scan.seconds, self.scan.corrupt, self.scan.temp_removed,
                    self.scan.untrusted)
        return None

    def stats(self) -> dict[str, float]:
        """A snapshot of every counter and gauge (see :class:`~.stats.Counters`)."""
        snap: dict[str, float] = dict(self.counters.snapshot())
        jobs, queued_bytes = self._writer.queued
        read_s, write_s = self._read_clock.seconds, self._write_clock.seconds
        snap.update(
            chunks=len(self._index), used_bytes=self._index.total_bytes,
            capacity_bytes=self.config.capacity_bytes,
            write_queue_depth=jobs, write_queue_bytes=queued_bytes,
            writes_in_flight=jobs + int(self._writer.busy),
            read_seconds=read_s, write_seconds=write_s,
            read_bandwidth=snap["bytes_read"] / read_s if read_s else 0.0,
            write_bandwidth=snap["bytes_written"] / write_s if write_s else 0.0,
            writes_enabled=not self._writer.failed, direct_io=self._mode.direct,
            rebuild_seconds=self.scan.seconds, rebuild_files=self.scan.files,
            temp_files_removed=self.scan.temp_removed)
        return snap

    def maybe_log_summary(self) -> bool:
        """Cheap to call often: logs at most one summary line per ``summary_interval``."""
        return self._summary.maybe_log(self.stats)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued writes (up to ``timeout`` s), stop the threads, release the folder."""
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        self._pool.shutdown(wait=True)
        if self._usage is not None:
            self._usage.close()
        if self._dir is not None:
            self._dir.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destination(dst: Destination | None, nbytes: int) -> np.ndarray:
    if dst is None:
        return alloc_aligned(nbytes, pin=False).numpy()
    array = as_byte_array(dst)
    if len(array) < nbytes:
        raise ValueError(f"destination of {len(array)} bytes is short of the {nbytes}-byte chunk")
    return array[:nbytes]


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
