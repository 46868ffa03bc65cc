"""The tier as a prefix cache uses it: find what the disk adds to a device hit, load it
into KV slots, and write computed prefixes through to disk in the background.

Engine-agnostic: SGLang's radix-cache backend (``patches/tier_cache.py``) maps its
requests, nodes and pools onto these calls. All methods except the packer's work run on
the caller's (scheduler) thread.

Write policy: write-through after prefill. Chunks of a request's computed prefix are
offered when the engine inserts them into its prefix tree; admission decides which are
worth a write; admitted chunks are copied out of the pool on a background thread while
the engine keeps their slots pinned, then written by the store's writer. Write-back on
eviction was rejected: it copies on the engine's critical path (eviction happens when
memory is needed now), and it loses everything on a crash or restart before eviction.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from . import faults
from ._log import logger
from .background import yield_cpu_to_serving
from .direct_io import alloc_aligned
from .keys import TokenIds, chunk_keys
from .kv_transfer import KVPool, pack_chunk, unpack_chunk
from .layout import ModelFingerprint
from .loader import Loader, LoadJob
from .store import ChunkStore

__all__ = ["DiskHit", "TierService", "namespace_of"]


@dataclass(frozen=True)
class DiskHit:
    """Tokens ``[device_len, end)`` of a prompt, found on disk.

    ``keys[i]`` holds tokens ``[(first_chunk + i) * C, (first_chunk + i + 1) * C)``; the
    first chunk may start before ``device_len`` and the last end after ``end``.
    """

    keys: list[str]
    chunk_tokens: list[TokenIds]
    first_chunk: int
    device_len: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.device_len

    def cut(self, length: int) -> DiskHit | None:
        """The same hit, ending ``length`` tokens after ``device_len`` (``None`` for 0):
        tensor-parallel ranks agree on the shortest hit among them."""
        if length <= 0:
            return None
        end = self.device_len + min(length, self.length)
        chunk = len(self.chunk_tokens[0])
        count = -(-(end - self.first_chunk * chunk) // chunk)
        return DiskHit(self.keys[:count], self.chunk_tokens[:count], self.first_chunk,
                       self.device_len, end)


@dataclass
class _PackJob:
    keys: list[str]
    chunk_tokens: list[TokenIds]
    slots: torch.Tensor  # (len(keys) * C,) on the pool's device
    handle: object  # returned by drain_written() once the slots are no longer read
    epoch: int  # cancel_copies() moves the service on: older jobs never read the pool


class TierService:
    """One rank's NVMe tier over a :class:`ChunkStore`.

    Parameters
    ----------
    store : ChunkStore
        The open store (this rank's own directory).
    fingerprint : ModelFingerprint
        Model, dtype and layout of this rank's KV; part of every chunk key.
    chunk_tokens : int
        Tokens per chunk (``tier.chunk_tokens``).
    pool : KVPool
        The engine's KV pool buffers.
    loads_in_flight : int
        Chunks read ahead of the one being copied into the pool.
    """

    def __init__(self, store: ChunkStore, fingerprint: ModelFingerprint, chunk_tokens: int,
                 pool: KVPool, loads_in_flight: int = 8) -> None:
        self.store, self.fingerprint, self.chunk = store, fingerprint, chunk_tokens
        self.layout = fingerprint.chunk_layout(chunk_tokens)
        pool.check(self.layout)
        self.pool = pool
        self.loads_in_flight = loads_in_flight
        staging = [alloc_aligned(self.layout.nbytes) for _ in range(loads_in_flight)]
        self.counters = {"lookups": 0, "disk_hit_tokens": 0, "loaded_tokens": 0,
                         "load_failures": 0, "load_seconds": 0.0, "offered_chunks": 0,
                         "packed_chunks": 0, "pack_seconds": 0.0, "copies_pending": 0,
                         "copies_cancelled": 0, "loads_cancelled": 0}
        self._count_lock = threading.Lock()  # the packer thread updates counters too
        # Held while a chunk is copied out of the pool, so cancel_copies() can wait for it.
        self._copy_lock = threading.Lock()
        self._epoch = 0
        self.failure: Exception | None = None  # an unexpected error on the packer thread
        self._jobs: queue.SimpleQueue[_PackJob | None] = queue.SimpleQueue()
        self._written: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._packer = threading.Thread(target=self._pack_loop, name="kvtier-pack", daemon=True)
        self._packer.start()
        self._loader = Loader(staging, self._submit_chunk, self._unpack, self._count_load)

    # ------------------------------------------------------------------------ reads

    def keys(self, namespace: str | None, token_ids: TokenIds) -> list[str]:
        """Keys of every whole chunk of ``token_ids``."""
        return chunk_keys(self.fingerprint, namespace, token_ids, self.chunk)

    def find(self, namespace: str | None, token_ids: TokenIds, device_len: int,
             limit: int | None = None) -> DiskHit | None:
        """What the disk holds of ``token_ids[:limit]`` right after the first ``device_len``.

        Only an index lookup: no I/O. Chunks are keyed by all of ``token_ids``, so the last
        chunk found may be used in part when ``limit`` cuts it (SGLang always computes at
        least the last prompt token: a 2048-token prompt reuses at most 2047).
        """
        faults.hit("match")
        self.counters["lookups"] += 1
        limit = len(token_ids) if limit is None else min(limit, len(token_ids))
        whole = -(-limit // self.chunk)  # chunks touching [0, limit)
        whole = min(whole, len(token_ids) // self.chunk)  # ... that are complete
        first = device_len // self.chunk
        if whole <= first:
            return None
        keys = self.keys(namespace, token_ids[:whole * self.chunk])[first:]
        found = self.store.contains_prefix(keys)
        end = min((first + found) * self.chunk, limit)
        if end <= device_len:
            return None
        pieces = [token_ids[(first + i) * self.chunk:(first + i + 1) * self.chunk]
                  for i in range(found)]
        return DiskHit(keys[:found], pieces, first, device_len, end)

    def load(self, hit: DiskHit, slots: torch.Tensor) -> bool:
        """Fill ``slots`` (``(hit.length,)`` int64 on the pool's device) with the hit's KV,
        waiting for it. False if any chunk turned out missing or corrupt: the caller
        recomputes (and frees ``slots``)."""
        job = self.submit_load(hit, slots)
        job.wait()
        if job.error is not None:
            raise job.error
        return bool(job.ok)

    def submit_load(self, hit: DiskHit, slots: torch.Tensor, order: str = "front",
                    pick=None, landed=None, depth=None) -> LoadJob:
        """Start filling ``slots`` with the hit's KV on the loader thread; returns at once.

        Reads run ``loads_in_flight`` chunks ahead of the copy into the pool. Poll
        ``job.done()``; then ``job.ok`` says whether every chunk verified (else recompute
        and free ``slots``), ``job.error`` holds an unexpected error. The slots must stay
        allocated until the job is done, cancelled or not. ``pick`` and ``landed``: the
        caller chooses the chunks one by one, ``depth`` how many are read at once (see
        :class:`~sgl_kvtier.tier.loader.LoadJob`), and it counts what it used.
        """
        faults.hit("load")
        # Found now, read later: the chunks must not be evicted from the disk meanwhile.
        return self._loader.submit(LoadJob(hit, slots, order, held=self.store.hold(hit.keys),
                                           pick=pick, landed=landed, depth=depth))

    def _submit_chunk(self, job: LoadJob, i: int, buf: torch.Tensor) -> Future:
        hit = job.hit
        return self.store.submit_load([hit.keys[i]], [hit.chunk_tokens[i]], self.layout,
                                      [buf])[0]

    def _unpack(self, job: LoadJob, i: int, payload: torch.Tensor) -> None:
        hit, slots = job.hit, job.slots
        chunk_start = (hit.first_chunk + i) * self.chunk
        skip = max(hit.device_len - chunk_start, 0)  # tokens of this chunk already on device
        stop = min(chunk_start + self.chunk, hit.end)  # the last chunk may be used in part
        lo, hi = chunk_start + skip - hit.device_len, stop - hit.device_len
        unpack_chunk(payload, self.layout, self.pool, slots[lo:hi], skip)

    def _count_load(self, job: LoadJob) -> None:
        self.store.release(job.held)
        length = job.hit.length
        self._count("load_seconds", job.seconds)
        if job.pick is not None:
            return  # chunk by chunk: the caller counts what it used
        if job.ok:
            self._count("disk_hit_tokens", length)
            self._count("loaded_tokens", length)
        elif job.cancelled:
            self._count("loads_cancelled", 1)
        elif job.error is None:
            self._count("load_failures", 1)
            logger.warning("kv tier: a chunk of a %d-token disk hit failed to load; "
                           "recomputing it", length)

    # ----------------------------------------------------------------------- writes

    def offer(self, namespace: str | None, token_ids: TokenIds, slots: torch.Tensor,
              from_chunk: int, handle: object) -> int:
        """Write through the whole chunks of a computed prefix, from chunk ``from_chunk``.

        Parameters
        ----------
        token_ids
            The prefix, ``(n,)``; only its whole chunks are offered.
        slots
            ``(n,)`` its KV slots. They must stay valid until ``handle`` comes back from
            :meth:`drain_written` (the caller pins them).
        handle
            Returned by :meth:`drain_written` once the copy is done; ``None`` if nothing
            was queued (then nothing needs pinning: check the return value).

        Returns
        -------
        int
            Number of whole chunks in ``token_ids`` (the next call's ``from_chunk``); the
            chunks queued for a write are counted in :meth:`stats`.
        """
        faults.hit("offer")
        whole = len(token_ids) // self.chunk
        if whole <= from_chunk:
            return whole
        keys = self.keys(namespace, token_ids[:whole * self.chunk])
        wanted = [i for i in range(from_chunk, whole) if self.store.admit(keys[i])]
        self.counters["offered_chunks"] += whole - from_chunk
        if wanted:
            index = torch.cat([torch.arange(i * self.chunk, (i + 1) * self.chunk)
                               for i in wanted]).to(slots.device)
            self._count("copies_pending", 1)
            self._jobs.put(_PackJob([keys[i] for i in wanted],
                                    [token_ids[i * self.chunk:(i + 1) * self.chunk]
                                     for i in wanted], slots.index_select(0, index), handle,
                                    self._epoch))
        else:
            self._written.put(handle)  # nothing to copy: release at once
        return whole

    def drain_written(self) -> list[object]:
        """Handles of offers whose KV has been copied out of the pool (unpin them)."""
        done = []
        while True:
            try:
                done.append(self._written.get_nowait())
            except queue.Empty:
                return done

    def cancel_copies(self) -> int:
        """Make sure no queued or running copy reads the pool after this returns.

        The engine calls it before it frees slots that offers pinned (a cache reset):
        those slots may be handed to other requests at once, and a copy reading them
        then would write another prompt's KV under this prompt's key, with a valid
        checksum. Waits only for the chunk being copied right now (milliseconds).

        Returns
        -------
        int
            Copy-out jobs that had not finished (their chunks are not written).
        """
        with self._copy_lock:
            self._epoch += 1
            with self._count_lock:
                return int(self.counters["copies_pending"])

    def _pack_loop(self) -> None:
        yield_cpu_to_serving()
        while (job := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                self._pack(job)
            except Exception as e:  # never lose the handle: the engine would keep the slots pinned
                if self.failure is None:
                    self.failure = e
                    logger.exception("kv tier: copying KV out of the pool failed")
            finally:
                self._count("pack_seconds", time.perf_counter() - start)
                self._count("copies_pending", -1)
                self._written.put(job.handle)

    def _pack(self, job: _PackJob) -> None:
        faults.hit("copy")
        for i, key in enumerate(job.keys):
            out = alloc_aligned(self.layout.nbytes)
            with self._copy_lock:
                if job.epoch != self._epoch:  # the slots were freed: they hold other KV now
                    self._count("copies_cancelled", 1)
                    return
                pack_chunk(self.pool, job.slots[i * self.chunk:(i + 1) * self.chunk], out,
                           self.layout)
            self.store.put(key, job.chunk_tokens[i], out, self.layout, admitted=True)
            self._count("packed_chunks", 1)

    def _count(self, name: str, delta: float) -> None:
        with self._count_lock:
            self.counters[name] += delta

    # ------------------------------------------------------------------------- rest

    def broken(self) -> Exception | None:
        """The first unexpected error (a bug, not the disk) of a background thread: the
        copy-out thread's or the store's writer's. The engine stops using the tier."""
        return self.failure or self.store.broken

    def stats(self) -> dict:
        """The store's counters and this service's, in one flat dict."""
        with self._count_lock:
            mine = dict(self.counters)
        return {**self.store.stats(), **mine}

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish copies and queued writes (up to ``timeout`` s for the writes)."""
        self._loader.close(timeout)
        self._jobs.put(None)
        self._packer.join(timeout)
        self.store.close(timeout)


def namespace_of(extra_key: object, cache_salt: object) -> str:
    """The tenant namespace of a request from the engine's ``extra_key`` (LoRA, caller
    tags) and ``cache_salt``: requests share chunks only when both are equal.

    Each part is length-prefixed (``None`` is ``-``), so no two different pairs give the
    same namespace: ``("a|b", None)`` and ``("a", "b|")`` stay apart whatever they contain.
    """
    if extra_key is None and cache_salt is None:
        return ""
    return "".join("-" if part is None else f"{len(str(part))}:{part}"
                   for part in (extra_key, cache_salt))
