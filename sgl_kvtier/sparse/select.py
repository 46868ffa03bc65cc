"""Which chunks each KV head attends at one decode step.

A chunk's landmark stands for its keys (with ``selection: bound``, the box around its keys
does). Each query head takes the softmax of its scores over the chunks; a KV head keeps a
chunk if *any* query head of its group wants it (max over the group, as ShadowKV does), then
the ``k`` best chunks per KV head are selected. Heads select independently: a needle seen by
one head need not be paid for by all.

A few heads copy from the prompt: one query head puts nearly all its attention on a handful
of tokens whose chunk's mean key looks like nothing in particular, so no landmark finds them
(the RULER samples sparse decode lost, ``docs/results/sparse-ruler/README.md``). The KV
heads named in ``sparse.exact_score_heads`` are scored from their exact keys instead
(:func:`exact_scores`): the softmax over every middle token, summed per chunk. That costs one
head's dense ``q . k`` per step, so it is kept to the few heads a calibration names.
"""

from __future__ import annotations

import torch

__all__ = ["chunk_scores", "bound_scores", "exact_scores", "select_chunks"]


def chunk_scores(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Per-KV-head chunk scores: the softmax over chunks, max over the GQA group.

    Parameters
    ----------
    q : torch.Tensor
        ``(H_q, D)`` one decode step's queries (post-RoPE).
    landmarks : torch.Tensor
        ``(H, N, D)``; ``H_q`` is a multiple of ``H``, query head ``i`` reads KV head
        ``i // (H_q // H)``.
    selectable : torch.Tensor
        ``(H, N)`` bool; other chunks score zero and are left out of the softmax.
    scale : float
        The attention's softmax scale.

    Returns
    -------
    torch.Tensor
        ``(H, N)`` float32 in ``[0, 1]``.
    """
    h, n, d = landmarks.shape
    logits = q.float().view(h, -1, d) @ landmarks.float().transpose(1, 2)  # [H, G, N]
    return _group_max(logits * scale, selectable)


def bound_scores(q: torch.Tensor, bounds: torch.Tensor, selectable: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Per-KV-head chunk scores from Quest's bound on ``q . k`` over a chunk's keys.

    ``sum_d max(q_d * min_d, q_d * max_d)`` is the largest score any key inside the chunk's
    per-dimension box can get: a chunk with one key that matches the query stands out even
    when its mean key does not. Softmax per query head and max over the group, as in
    :func:`chunk_scores`.

    ``bounds`` is ``(2, H, N, D)``: per chunk, the smallest and the largest post-RoPE key
    in each dimension; the other arguments and the result are as in :func:`chunk_scores`.
    """
    low, high = bounds.float()
    h, n, d = high.shape
    q = q.float().view(h, -1, d)
    logits = q.clamp(min=0) @ high.transpose(1, 2) + q.clamp(max=0) @ low.transpose(1, 2)
    return _group_max(logits * scale, selectable)


def exact_scores(q: torch.Tensor, keys: torch.Tensor, selectable: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Chunk scores of a few KV heads from their exact keys: each query head's softmax over
    the selectable chunks' tokens, summed per chunk, max over the GQA group.

    Parameters
    ----------
    q : torch.Tensor
        ``(E, G, D)`` the post-RoPE queries of those heads' groups.
    keys : torch.Tensor
        ``(E, N, C, D)`` their middle's post-RoPE keys by chunk.
    selectable : torch.Tensor
        ``(E, N)`` bool; other chunks score zero and are left out of the softmax.
    scale : float
        The attention's softmax scale.

    Returns
    -------
    torch.Tensor
        ``(E, N)`` float32 in ``[0, 1]``, comparable within a row like :func:`chunk_scores`.
    """
    e, n, c, d = keys.shape
    # The product runs in the keys' dtype (a float32 copy of a long prompt's keys would cost
    # more than the scoring); only the [E, G, NC] logits are upcast for the softmax.
    flat = keys.reshape(e, n * c, d).transpose(1, 2)
    logits = (q.to(keys.dtype) @ flat).float() * scale  # [E, G, NC]
    able = selectable.repeat_interleave(c, dim=1)  # [E, N*C]
    probs = logits.masked_fill(~able[:, None, :], float("-inf")).softmax(-1)
    return probs.view(e, -1, n, c).sum(-1).amax(1)


def _group_max(logits: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
    # logits [H, G, N] -> softmax over the selectable chunks per query head, max over G.
    logits = logits.masked_fill(~selectable[:, None, :], float("-inf"))
    return logits.softmax(-1).amax(1)


def select_chunks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best chunks per KV head, ``(H, k)`` int64 ascending (``scores (H, N)``)."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values
