"""What the radix cache and the attention backend tell each other about sparse requests.

Both live in the scheduler process (the model runs in it), on the scheduler's thread or
its overlap worker: the tree sees requests (tokens, locks), the backend sees batches (rids,
pool rows). The order of a request's life:

1. ``eligible``: the tree checkpointed the request's whole prompt (``boundary`` tokens, all
   now the tree's, locked by the request).
2. ``converted``: the backend copied the prompt's KV out of the pool into the sparse state
   and decodes it sparsely from then on. That happens once the request's first
   ``sparse.dense_answer_tokens`` answer tokens are out (``convert_at``), at its second
   decode step at the earliest, never its first: under the overlap scheduler the first
   decode step may run before or after the tree's offer (two threads), and a request's
   output must not depend on which came first. The dense steps read the prompt where it
   still is, exactly.
3. ``released``: after the batch, the tree dropped the request's lock on the prompt: it is
   evictable (and, with the NVMe tier, reusable from disk); the request never reads those
   slots again.

A request that ends, is aborted or is retracted leaves all three (``forget``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["SparseBridge", "Eligible", "bridge", "install_bridge"]


@dataclass(frozen=True)
class Eligible:
    tokens: tuple[int, ...]  # the prompt the state covers
    boundary: int
    scope: str = ""  # the tenant (extra key, cache salt): states are shared within one
    budget: float | None = None  # the request's budget fraction; None: the server's
    convert_at: int = 0  # the sequence length (prompt + dense answer tokens, at least 2:
    # the second decode step) from which the backend converts


class SparseBridge:
    """Per-process registry keyed by request id (thread-safe)."""

    def __init__(self, manager):
        self.manager = manager  # sgl_kvtier.sparse.manager.SparseManager
        self._lock = threading.Lock()
        self.eligible: dict[str, Eligible] = {}
        self.converted: dict[str, int] = {}  # rid -> boundary
        self.released: set[str] = set()

    def offer(self, rid: str, tokens: tuple[int, ...], boundary: int, scope: str = "",
              budget: float | None = None, convert_at: int = 0) -> None:
        with self._lock:
            if rid not in self.converted:
                self.eligible[rid] = Eligible(tokens, boundary, scope, budget, convert_at)

    def take(self, rid: str, seq_len: int) -> Eligible | None:
        """The request's offer, once a decode step of ``seq_len`` tokens may convert it."""
        with self._lock:
            offer = self.eligible.get(rid)
            if offer is None or seq_len < offer.convert_at:
                return None
            return self.eligible.pop(rid)

    def mark_converted(self, rid: str, boundary: int) -> None:
        with self._lock:
            self.converted[rid] = boundary

    def boundary(self, rid: str) -> int | None:
        return self.converted.get(rid)

    def forget(self, rid: str) -> None:
        with self._lock:
            self.eligible.pop(rid, None)
            self.converted.pop(rid, None)
            self.released.discard(rid)
        self.manager.finish(rid)

    def clear(self) -> None:
        with self._lock:
            rids = set(self.eligible) | set(self.converted)
            self.eligible.clear()
            self.converted.clear()
            self.released.clear()
        for rid in rids:
            self.manager.finish(rid)


_bridge: SparseBridge | None = None


def install_bridge(manager) -> SparseBridge:
    """Called by the attention backend once it knows the model (one per process)."""
    global _bridge
    _bridge = SparseBridge(manager)
    return _bridge


def bridge() -> SparseBridge | None:
    """The process's bridge, or None where sparse decode is off."""
    return _bridge
