"""ChunkStore: KV chunks in files under one directory, with an index, a capacity and a writer.

Guarantees, whatever the disk does:

* A load returns the bytes that were put under that key, or ``None``: every payload is
  checksummed on every load, and the header must name the key (and, when given, the
  tokens and layout) the caller asked for.
* I/O errors never reach the caller: reads turn into misses, write errors into read-only
  mode (one log line).
* Only renamed files are chunks, so a crash mid-write leaves nothing readable behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ._log import log_once, logger
from .admission import make_admission
from .chunk_file import ChecksumMismatch, CorruptChunk, file_size
from .chunk_io import ChunkMismatch, read_chunk, write_chunk
from .config import StoreConfig
from .direct_io import BLOCK, IOMode, alloc_aligned, as_byte_array
from .index import ChunkIndex
from .keys import TokenIds, check_key, chunk_path, token_digest
from .layout import ChunkLayout
from .recovery import ScanResult, quarantine, scan
from .stats import BusyClock, Counters, SummaryLog
from .throttle import TokenBucket
from .writer import BackgroundWriter, ReadGate, WriteJob

__all__ = ["ChunkStore", "TierLocked", "Destination"]

Destination = torch.Tensor | np.ndarray | bytearray | memoryview
_LOCK_FILE = "LOCK"


class TierLocked(RuntimeError):
    """Another live store (this process or another) owns the directory."""


class ChunkStore:
    """Disk tier of KV chunks addressed by :func:`~sgl_kvtier.tier.keys.chunk_keys` keys.

    Opening rebuilds the index from the files' headers. ``put`` is asynchronous; ``load``
    reads a batch on ``read_threads`` threads, ahead of any write in progress.

    Raises
    ------
    TierLocked
        If another open store holds ``config.root``.
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
        self._lock_fd: int | None = None
        root_error = self._open_root()
        self.scan = self._rebuild() if self.root.is_dir() else ScanResult()
        self._pool = ThreadPoolExecutor(config.read_threads, thread_name_prefix="kvtier-read")
        self._writer = BackgroundWriter(self._commit, self.counters,
                                        config.max_queued_write_bytes,
                                        config.write_retry_interval)
        if root_error is not None:
            self._writer.turn_off(root_error)

    # ------------------------------------------------------------------ lookups and loads

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (queued writes do not count)."""
        return self._index.prefix_length(keys)

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
            if self._closed or not self._index.pin(check_key(key)):
                self.counters.add(misses=1)
                futures.append(_done(None))
            else:
                futures.append(self._pool.submit(self._load_pinned, key, digest, layout, dst))
        return futures

    def _load_pinned(self, key: str, digest: bytes | None, layout: ChunkLayout | None,
                     dst: Destination | None) -> torch.Tensor | None:
        path = chunk_path(self.root, key)
        try:
            with self._gate.reading(), self._read_clock:
                payload = read_chunk(path, key, lambda n: _destination(dst, n), self._mode,
                                     token_digest=digest, layout=layout,
                                     throttle=self._throttle)
        except FileNotFoundError:
            self._index.remove(key)
            self.counters.add(misses=1, missing_files=1)
        except ChunkMismatch as e:
            self.counters.add(misses=1, mismatches=1)
            log_once("mismatch", logging.WARNING, "kv tier: %s holds other %s than asked for; "
                     "treated as a miss (later ones are only counted)", path, e)
        except CorruptChunk as e:
            self._discard(key, path, e)
        except OSError as e:
            # An unreadable file is as good as a corrupt one, and would fail again.
            self._discard(key, path, CorruptChunk(f"read failed: {e}"))
        else:
            self.counters.add(hits=1, bytes_read=len(payload))
            if isinstance(dst, torch.Tensor):
                return dst.reshape(-1).view(torch.uint8)[:len(payload)]
            return torch.from_numpy(payload)
        finally:
            self._index.unpin(key)
        return None

    def _discard(self, key: str, path: Path, error: CorruptChunk) -> None:
        self._index.remove(key)
        moved = quarantine(self.root, path, str(error))
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
        if job.key in self._index:
            return
        payload_len = len(job.payload)
        if not self._make_room(file_size(payload_len)):
            self.counters.add(capacity_refusals=1)
            return
        path = chunk_path(self.root, job.key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with self._write_clock:
            write_chunk(path, job.key, job.token_digest, job.layout, job.payload, self._mode,
                        self._staging, fsync=self.config.fsync, pause=self._let_reads_pass)
        self._index.add(job.key, file_size(payload_len))
        self.counters.add(bytes_written=payload_len, chunks_written=1)

    def _let_reads_pass(self) -> None:
        self._gate.wait_idle(self.config.reads_first_max_wait)

    def clear(self) -> int:
        """Delete every chunk not being read right now; returns how many were deleted."""
        victims = self._index.remove_unpinned()
        for key in victims:
            chunk_path(self.root, key).unlink(missing_ok=True)
        return len(victims)

    def _make_room(self, nbytes: int) -> bool:
        victims = self._index.evict_for(nbytes, self.config.capacity_bytes)
        if victims is None:
            return False
        for key in victims:
            chunk_path(self.root, key).unlink(missing_ok=True)
        self.counters.add(evictions=len(victims))
        return True

    # --------------------------------------------------------------- open, stats, close

    def _open_root(self) -> OSError | None:
        """Create and lock the root; the error that makes this store read-only, if any."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._lock_fd = os.open(self.root / _LOCK_FILE, flags, 0o600)
        except OSError as e:
            return e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TierLocked(f"{self.root} is in use by another kv tier store") from None
            return e
        return None

    def _rebuild(self) -> ScanResult:
        try:
            result = scan(self.root, self._mode)
        except OSError as e:
            log_once("scan", logging.WARNING, "kv tier: cannot list %s (%s); starting empty",
                     self.root, e)
            return ScanResult()
        for key, size in result.chunks:
            self._index.add(key, size)
        self._make_room(0)  # the capacity may have shrunk since the last run
        self.counters.add(corrupt_files=result.corrupt, quarantined=result.corrupt)
        logger.info("kv tier: %d chunks (%.2f GiB) in %s; index rebuilt in %.2f s, %d bad files "
                    "quarantined, %d temporary files removed", len(self._index),
                    self._index.total_bytes / 2**30, self.root, result.seconds, result.corrupt,
                    result.temp_removed)
        return result

    def stats(self) -> dict[str, float]:
        """A snapshot of every counter and gauge (see :class:`~.stats.Counters`)."""
        snap: dict[str, float] = dict(self.counters.snapshot())
        jobs, queued_bytes = self._writer.queued
        read_s, write_s = self._read_clock.seconds, self._write_clock.seconds
        snap.update(
            chunks=len(self._index), used_bytes=self._index.total_bytes,
            capacity_bytes=self.config.capacity_bytes,
            write_queue_depth=jobs, write_queue_bytes=queued_bytes,
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
        """Finish queued writes (up to ``timeout`` s), stop the threads, release the root."""
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        self._pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

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
