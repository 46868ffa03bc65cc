"""Bidirectional prefill in SGLang's scheduler: compute a disk hit's front, load its back.

A waiting request whose disk hit is at least ``prefill.min_prefix_tokens`` long is admitted
at once (no waiting for its load). The tier's loader reads its chunks from the back, asking
a :class:`~sgl_kvtier.prefill.session.PrefixSession` for each next one, while SGLang's
chunked prefill computes it from the front: every round the prefill adder of
``patches/tier_loads.py`` asks :meth:`Bidirectional.budget` how many tokens the request may
compute, so that it never computes into the loaded part. Where the computed front reaches
loaded chunks, their slots are written into the request's row behind it and published to
the radix tree (``RadixCache.checkpoint``), and the request's prefix jumps over them; once
the whole hit is present it prefills only the tokens after it.

Slots: the whole hit gets slots when the request is admitted (the loader may write into any
of them). Slots of chunks that ended up computed are freed once the loader has let go of
them (:meth:`Bidirectional.free_retired`, after every batch).

Reads run one at a time while compute runs beside them (the planner's view of what is
loading, and since when, is then the disk's), and as deep as the loader's buffers while
compute waits on them. While other requests decode, a round with a compute chunk is followed
by one without, so the decodes get a step between two chunks.

A request may choose with ``sampling_params.custom_params = {"kvtier_prefill": METHOD}``:
``"load"`` loads its hit whole, ``"compute"`` recomputes it, ``"bidirectional"`` is the
default (benchmarks compare the three on one server, in one run).

Only with a single tensor-parallel rank: the rounds' decisions depend on this rank's clock.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from sgl_kvtier.config import PrefillConfig
from sgl_kvtier.prefill.rates import RateBook
from sgl_kvtier.prefill.session import PrefixSession
from sgl_kvtier.tier.loader import LoadJob

log = logging.getLogger("sgl_kvtier")


@dataclass(eq=False)
class _Flight:
    """A request whose disk hit is being computed and loaded at once."""

    session: PrefixSession
    job: LoadJob
    marker: object  # tier_cache._Marker: the hit and its key
    node: object  # locked: the tree node the hit continues (moves as loaded parts join)
    given: torch.Tensor  # (hit.length,) bool: slots handed to the tree or the row
    computed_last_round: bool = False


class Bidirectional:
    """The bidirectional prefills of one ``KVTierRadixCache``."""

    def __init__(self, cache, config: PrefillConfig):
        self.cache, self.config = cache, config
        # Carried across requests, and fed by every prefill batch and whole-hit load: the
        # next bidirectional prefill starts informed.
        self.rates = RateBook.empty()
        self.flights: dict[str, _Flight] = {}
        self._retired: list[tuple[LoadJob, torch.Tensor]] = []
        self.recent: deque[dict] = deque(maxlen=16)
        self.counters: Counter = Counter(dict.fromkeys(
            ("prefills", "computed_tokens", "loaded_tokens", "loads_failed", "aborted"), 0))

    # Smaller batches time the step's overhead more than the model.
    MIN_SAMPLE_TOKENS = 128

    def observe_compute(self, rids: list[str], tokens: int, seconds: float) -> None:
        """A prefill batch of ``tokens`` took ``seconds``: the compute-rate prior of the
        next bidirectional prefill (its own chunks are timed by its session)."""
        if tokens >= self.MIN_SAMPLE_TOKENS and not any(r in self.flights for r in rids):
            self.rates.compute.add(tokens, seconds)

    def wants(self, hit, req) -> bool:
        return (hit.length >= max(self.config.min_prefix_tokens, 1)
                and method_of(req) not in ("load", "compute"))

    # ------------------------------------------------------------------ start

    def _bounds(self, hit) -> list[int]:
        # Tier-chunk boundaries of the hit, relative to its first token.
        chunk = self.cache.tier.chunk
        return [0] + [min((hit.first_chunk + i + 1) * chunk, hit.end) - hit.device_len
                      for i in range(len(hit.keys))]

    def start(self, req, marker) -> bool:
        """Admit ``req`` now: slots for the whole hit, its chunks read from the back. The
        device prefix the hit continues is locked (by the caller) until the hit is in.
        False if the hit's slots do not fit (the request recomputes)."""
        hit, tier = marker.hit, self.cache.tier
        slots = self.cache._alloc(hit, req)
        if slots is None:
            return False
        session = PrefixSession(self._bounds(hit), self.config.chunk_tokens, self.rates)
        try:
            job = tier.submit_load(hit, slots, order="back", pick=session.pick,
                                   landed=session.landed, depth=session.depth)
        except Exception:
            self.cache.token_to_kv_pool_allocator.free(slots)
            raise
        given = torch.zeros(hit.length, dtype=torch.bool)
        self.flights[req.rid] = _Flight(session, job, marker, marker.node, given)
        req.host_hit_length = 0  # SGLang computes from the device prefix; we splice the rest
        return True

    # ------------------------------------------------------------ every round

    def budget(self, req, decoding: bool = False) -> int | None:
        """Tokens ``req`` may compute this round (0: let it wait), or None: no limit (not a
        bidirectional prefill, or its whole hit is present). ``decoding``: other requests
        are decoding; they then get a step between two compute chunks (SGLang would run a
        chunked prefill's chunks back to back, and the decodes wait for all of them)."""
        flight = self.flights.get(req.rid)
        if flight is None:
            return None
        if flight.job.done() and flight.job.error is not None:
            self.cache._fail("loading a prompt's chunks in the background")
            flight.session.loader_failed()
        hit = flight.marker.hit
        front = _front(req, hit)
        step = flight.session.step(front)
        if step.present > front:
            self._adopt(req, flight, front, step.present)
        if step.compute is None:
            self._finish(req, flight)
            return None
        if step.compute and decoding and flight.computed_last_round:
            flight.computed_last_round = False
            return 0
        flight.computed_last_round = step.compute > 0
        return step.compute

    def _adopt(self, req, flight: _Flight, front: int, upto: int) -> None:
        """Loaded tokens ``[front, upto)`` of the hit join the tree behind the front."""
        hit, slots = flight.marker.hit, flight.job.slots
        if _row(req) is None:  # not admitted yet: nothing computed, the hit starts it
            marker = flight.marker
            key = RadixKey(marker.key.token_ids[:hit.device_len + upto], marker.key.extra_key,
                           cache_salt=marker.key.cache_salt)
            prefix = self.cache.path_device_indices(flight.node)  # hit.device_len + front
            value = torch.cat([prefix, slots[front:upto]])
            duplicate = self.cache.insert(InsertParams(key=key, value=value)).prefix_len
            if duplicate > len(prefix):  # reached the device meanwhile: keep the tree's copy
                self.cache.token_to_kv_pool_allocator.free(
                    slots[front:front + duplicate - len(prefix)])
            flight.given[front:upto] = True
            req.init_next_round_input(self.cache)  # its prefix now reaches past them
            # Hold what joined until the request is admitted and holds it itself.
            self.cache.inc_lock_ref(req.last_node)
            self.cache.dec_lock_ref(flight.node)
            flight.node = req.last_node
            return
        start, stop = hit.device_len + front, hit.device_len + upto
        pool = self.cache.req_to_token_pool
        pool.write((_row(req), slice(start, stop)), slots[front:upto].to(torch.int32))
        self.cache.checkpoint(req, up_to=stop)  # duplicates are freed by the tree
        flight.given[front:upto] = True
        req.prefix_len = req.extend_end = stop

    def _finish(self, req, flight: _Flight) -> None:
        del self.flights[req.rid]
        self._retire(flight)
        self.cache.dec_lock_ref(flight.node)
        report = flight.session.report
        self.counters["prefills"] += 1
        self.counters["computed_tokens"] += report.computed_tokens
        self.counters["loaded_tokens"] += report.loaded_tokens
        self.counters["loads_failed"] += report.loads_failed
        hit = flight.marker.hit
        req.storage_hit_length = report.loaded_tokens
        req.storage_hit_start = hit.device_len + report.split
        entry = {"rid": req.rid, "tokens": report.tokens, "split": report.split,
                 "computed_tokens": report.computed_tokens,
                 "loaded_tokens": report.loaded_tokens,
                 "chunks_computed": report.chunks_computed,
                 "chunks_loaded": report.chunks_loaded, "loads_failed": report.loads_failed,
                 "compute_tokens_per_s": report.compute_tokens_per_s,
                 "load_tokens_per_s": report.load_tokens_per_s,
                 "seconds": report.elapsed_s}
        self.recent.append(entry)
        log.info("sgl_kvtier: bidirectional prefill of %d cached tokens: computed %d, loaded "
                 "%d (split at %d), %.2f s; compute %s tok/s, load %s tok/s%s",
                 report.tokens, report.computed_tokens, report.loaded_tokens, report.split,
                 report.elapsed_s, _rate(report.compute_tokens_per_s),
                 _rate(report.load_tokens_per_s),
                 f", {report.loads_failed} chunk(s) failed and were computed"
                 if report.loads_failed else "")

    # -------------------------------------------------------------- releasing

    def _retire(self, flight: _Flight) -> None:
        # The loader may still be reading into slots of chunks that compute took over.
        flight.job.cancel()
        left = flight.job.slots[~flight.given]
        if len(left):
            self._retired.append((flight.job, left))

    def free_retired(self, wait: bool = False) -> None:
        """Free the slots of finished prefixes once the loader is done with them."""
        keep = []
        for job, slots in self._retired:
            if wait:
                job.wait()
            if job.done():
                self.cache.token_to_kv_pool_allocator.free(slots)
            else:
                keep.append((job, slots))
        self._retired = keep

    def abort(self, rid: str) -> bool:
        """``rid`` left (aborted, retracted): stop its loads, free what it did not hand on."""
        flight = self.flights.pop(rid, None)
        if flight is None:
            return False
        self._retire(flight)
        self.cache.dec_lock_ref(flight.node)
        self.counters["aborted"] += 1
        return True

    def reset(self) -> None:
        """The pool is about to be cleared: no loader may write into it afterwards."""
        for flight in self.flights.values():
            flight.job.cancel()
        for flight in self.flights.values():
            flight.job.wait()
        for job, _ in self._retired:
            job.wait()
        self.flights.clear()
        self._retired.clear()

    def jobs(self) -> list[LoadJob]:
        return [f.job for f in self.flights.values() if not f.job.done()]

    def state(self) -> dict:
        return {"enabled": True, "active": len(self.flights), **self.counters,
                "recent": list(self.recent)}


METHODS = ("bidirectional", "load", "compute")


def method_of(req) -> str | None:
    """The per-request choice ``sampling_params.custom_params.kvtier_prefill`` (one of
    ``METHODS``): how a disk hit is produced, for benchmarks that compare the three on one
    server. ``None`` (or anything else): the server's configuration decides."""
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    method = params.get("kvtier_prefill") if isinstance(params, dict) else None
    return method if method in METHODS else None


def _row(req):
    return getattr(req.kv, "req_pool_idx", None)


def _front(req, hit) -> int:
    # The computed (or adopted) part of the hit: the request's prefix beyond the device's.
    return max(min(req.prefix_len, hit.end) - hit.device_len, 0)


def _rate(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"

