"""Selection and workspace bookkeeping for every sparse request of a batch at one layer.

Stepping request by request costs about a dozen small operations and two host
synchronisations per request and layer (did the selection change? how many chunks
missed?): on an H200 at batch 44 the host spent 9.3 of 22.9 ms per layer doing that
(docs/results/sparse-gpu). Here the requests that select the same number of chunks are
stacked as rows of one ``(requests x KV heads, chunks)`` table: one top-k, one slot
assignment, one miss list and one synchronisation per layer for the whole group. Scoring
and the rebuild/fetch of missed chunks stay per request, as each reads its own prompt state.

Rows of different requests are independent, so the result is the per-request result: the
same chunks held in the same slots (:func:`assign_slots` works row by row), the same bytes in
the workspace, the same counters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sgl_kvtier.sparse.request import SparseRequest

__all__ = ["select_and_refresh", "assign_slots"]

# Pads score rows of shorter prompts: real scores are softmax weights in [0, 1], so a pad
# is never among a row's top k (a plan selects at most the chunks its prompt has).
_PAD = -1.0


def select_and_refresh(requests: Sequence[SparseRequest], layer: int, q: torch.Tensor,
                       scale: float) -> None:
    """Select each request's chunks at ``layer`` and bring its workspace region up to date.

    Parameters
    ----------
    requests : sequence of SparseRequest
        On one workspace, in batch order.
    layer : int
        The layer (its state is selected from, its workspace layer is written).
    q : torch.Tensor
        ``(B, H_q, D)`` post-RoPE queries, row ``b`` for ``requests[b]``.
    scale : float
        The attention's softmax scale.
    """
    groups: dict[int, list[int]] = {}
    for b, request in enumerate(requests):
        groups.setdefault(request.plan.selected_chunks, []).append(b)
    for k, members in groups.items():
        start = time.perf_counter()
        group = [requests[b] for b in members]
        scores = [r.ops.scores(q[b], r.layers[layer], scale) for b, r in zip(members, group)]
        chunks = _stack(scores).topk(k, dim=1).indices.sort(dim=1).values  # [G*H, k]
        seconds = (time.perf_counter() - start) / len(group)
        for r in group:
            r.stats.select_seconds += seconds
            if (exact := r.layers[layer].exact_heads) is not None:
                r.stats.exact_scored += exact.numel()
        _refresh(group, layer, chunks)


def _stack(scores: list[torch.Tensor]) -> torch.Tensor:
    """``(H, N_i)`` rows of each request -> ``(sum H, max N)``, short rows padded."""
    width = max(s.shape[1] for s in scores)
    if all(s.shape[1] == width for s in scores):
        return torch.cat(scores)
    table = scores[0].new_full((sum(s.shape[0] for s in scores), width), _PAD)
    row = 0
    for s in scores:
        table[row:row + s.shape[0], :s.shape[1]] = s
        row += s.shape[0]
    return table


def _refresh(group: list[SparseRequest], layer: int, chunks: torch.Tensor) -> None:
    """Hold exactly ``chunks (G*H, k)`` (request ``i``'s heads in rows ``i*H..``)."""
    h = group[0].heads
    for r in group:
        r.stats.selected_chunks += h * chunks.shape[1]
    one = len(group) == 1  # a request stepped alone: its own rows, no copies
    held = group[0].held[layer] if one else torch.cat([r.held[layer] for r in group])
    if torch.equal(held.sort(dim=1).values, chunks):
        return  # the common step: every request holds last step's chunks
    slot, miss = assign_slots(held, chunks)
    held.scatter_(1, slot, chunks)
    for i, r in enumerate(group if not one else ()):
        r.held[layer].copy_(held[i * h:(i + 1) * h])
    rows, j = miss.nonzero(as_tuple=True)  # row-major: each request's misses together
    counts = ([rows.numel()] if one
              else torch.bincount(rows // h, minlength=len(group)).tolist())
    for i, (r, rows_i, j_i) in enumerate(zip(group, rows.split(counts), j.split(counts))):
        if rows_i.numel():
            r.write_missed(layer, rows_i - i * h, chunks[rows_i, j_i], slot[rows_i, j_i])


def assign_slots(held: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for this step's chunks, keeping every chunk held last step where it is.

    Parameters
    ----------
    held : torch.Tensor
        ``(H, k)`` chunk id in each slot, -1 for empty.
    chunks : torch.Tensor
        ``(H, k)`` this step's chunk ids, distinct within a row.

    Returns
    -------
    slot : torch.Tensor
        ``(H, k)`` int64, the slot of each chunk (a permutation of ``0..k-1`` per row).
    miss : torch.Tensor
        ``(H, k)`` bool, True where the chunk was not held (it must be rebuilt).
    """
    sorted_held, order = held.sort(dim=1)
    pos = torch.searchsorted(sorted_held, chunks).clamp(max=held.shape[1] - 1)
    hit = sorted_held.gather(1, pos) == chunks
    hit_slot = order.gather(1, pos)
    # A slot is kept if some hit lands in it (misses add zero to slot 0).
    kept = torch.zeros_like(chunks).scatter_add(1, torch.where(hit, hit_slot, 0),
                                                hit.long()) > 0
    # Free slots in ascending order go to the misses in order; counts match per row.
    free = torch.argsort(kept.int(), dim=1, stable=True)
    misses = torch.argsort(hit.int(), dim=1, stable=True)
    slot = torch.empty_like(chunks).scatter(1, misses, free)
    return torch.where(hit, hit_slot, slot), ~hit
