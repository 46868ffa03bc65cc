"""Copies between a serving engine's KV pool and chunk payloads.

The pool is what SGLang's ``MHATokenToKVPool`` holds: per layer, a key and a value tensor
of shape ``(slots, kv_heads, head_dim)``, indexed by token slot. A chunk payload is the
same KV for ``tokens`` consecutive positions, packed as ``(layers, 2, tokens, kv_heads,
head_dim)`` (see :class:`~sgl_kvtier.tier.layout.ChunkLayout`), always on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import ChunkLayout

__all__ = ["KVPool", "pack_chunk", "unpack_chunk"]


@dataclass(frozen=True)
class KVPool:
    """Per-layer views of a KV pool: ``k[l]`` and ``v[l]`` are ``(slots, heads, head_dim)``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def check(self, layout: ChunkLayout) -> None:
        """Raise ``ValueError`` unless this pool holds KV of ``layout``'s shape and dtype."""
        want = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.torch_dtype)
        have = (len(self.k), self.k[0].shape[1], self.k[0].shape[2], self.k[0].dtype)
        if want != have or len(self.v) != len(self.k):
            raise ValueError(f"KV pool (layers, heads, head_dim, dtype) = {have}; the tier's "
                             f"layout says {want}")


def pack_chunk(pool: KVPool, slots: torch.Tensor, out: torch.Tensor,
               layout: ChunkLayout) -> torch.Tensor:
    """Copy the KV of ``slots`` into the payload ``out``.

    Parameters
    ----------
    pool : KVPool
        Source buffers, on the pool's device.
    slots : torch.Tensor
        ``(layout.tokens,)`` int64 slot indices on the pool's device, in token order.
    out : torch.Tensor
        ``(layout.nbytes,)`` uint8 CPU tensor (pinned on GPU hosts for a fast copy).

    Returns
    -------
    torch.Tensor
        ``out``. On a GPU pool the copy is complete when this returns.
    """
    view = layout.view(out)  # (layers, 2, tokens, heads, head_dim)
    if pool.device.type == "cpu":
        run, rows = _run(slots), slots.numpy()
        for layer, (k, v) in enumerate(zip(pool.k, pool.v)):
            for src, dst in ((k, view[layer, 0]), (v, view[layer, 1])):
                if run is not None:
                    np.copyto(_np(dst), _np(src[run]))
                else:
                    np.take(_np(src), rows, axis=0, out=_np(dst))
        return out
    gathered = torch.stack([torch.stack((k.index_select(0, slots), v.index_select(0, slots)))
                            for k, v in zip(pool.k, pool.v)])
    view.copy_(gathered, non_blocking=False)
    return out


def unpack_chunk(payload: torch.Tensor, layout: ChunkLayout, pool: KVPool,
                 slots: torch.Tensor, first_token: int = 0) -> None:
    """Write tokens ``first_token ..`` of a chunk payload into the pool at ``slots``.

    Parameters
    ----------
    payload : torch.Tensor
        ``(layout.nbytes,)`` uint8 CPU tensor, as :func:`pack_chunk` writes it.
    slots : torch.Tensor
        ``(n,)`` int64 slots on the pool's device, ``n <= layout.tokens - first_token``.
    first_token : int
        Skip the chunk's first tokens (already on the device, e.g. a partial device hit).
    """
    view = layout.view(payload)
    n = slots.numel()
    part = view[:, :, first_token:first_token + n]  # (layers, 2, n, heads, head_dim)
    if pool.device.type != "cpu":
        # A blocking copy (DMA from the pinned staging buffer): the caller reuses that buffer
        # for the next read as soon as this returns. Reads of later chunks keep running on
        # the store's threads meanwhile, so disk and copy still overlap.
        part = part.to(pool.device)
        for layer, (k, v) in enumerate(zip(pool.k, pool.v)):
            k.index_copy_(0, slots, part[layer, 0])
            v.index_copy_(0, slots, part[layer, 1])
        return
    run, rows = _run(slots), slots.numpy()
    for layer, (k, v) in enumerate(zip(pool.k, pool.v)):
        for dst, src in ((k, part[layer, 0]), (v, part[layer, 1])):
            if run is not None:
                np.copyto(_np(dst[run]), _np(src))
            else:
                _np(dst)[rows] = _np(src)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a NumPy array (any dtype, bfloat16 included), no copy.

    Copies go through NumPy because its copies are single-threaded: torch's CPU copies
    synchronise an OpenMP team per call, which costs milliseconds per call when another
    process holds a core (measured: 30 x 196 KB copies took 224 ms with 2 threads under
    load, 0.6 ms with NumPy or 1 thread).
    """
    return t.view(torch.uint8).numpy()


def _run(slots: torch.Tensor) -> slice | None:
    """``slots`` as a slice when they are consecutive (the allocator's usual answer): plain
    copies of contiguous rows are several times faster than indexed ones."""
    n = slots.numel()
    if n == 0:
        return None
    first, last = int(slots[0]), int(slots[-1])
    if last - first != n - 1 or (n > 1 and not bool((slots.diff() == 1).all())):
        return None
    return slice(first, last + 1)
