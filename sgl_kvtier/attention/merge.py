"""Attention in parts: each part of the keys gives an output and its log-sum-exp (an
attention *state*), and states merge exactly into the attention over all the parts.

Used where one softmax cannot see all keys at once without copying them: decode over a
request's KV slots scattered in several runs of the pool (:mod:`sgl_kvtier.attention.dense`),
and an extend split into a cached part (no mask) and a new part (causal). The merge is
the one FlashInfer's cascade attention uses::

    m   = max_i lse_i
    out = sum_i exp(lse_i - m) * out_i / sum_i exp(lse_i - m)
    lse = m + log(sum_i exp(lse_i - m))

States are kept in float32 whatever the input dtype: rounding each part's output to
bfloat16 before the merge would add one rounding per part on top of the final one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

__all__ = ["partial_attention", "partial_attention_ref", "causal_partial_attention",
           "merge_attention_states"]

log = logging.getLogger("sgl_kvtier")


@functools.cache
def _cpu_flash_op():
    """ATen's CPU flash attention returning ``(out, lse)``, or None (logged once)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        log.warning("sgl_kvtier: torch %s has no CPU flash attention with log-sum-exp; "
                    "multi-run decode uses the explicit float32 softmax", torch.__version__)
    return op


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of ``q`` over one part of the keys, in float32, with its state.

    Parameters
    ----------
    q : torch.Tensor
        ``(H, Lq, D)``.
    k, v : torch.Tensor
        ``(H, Lk, D)`` and ``(H, Lk, Dv)``, any strides (views of a KV pool work); any
        floating dtype, computed in float32 (by ATen's CPU flash attention when on CPU with
        ``Dv == D``, else by :func:`partial_attention_ref`).
    scale : float
        Softmax scale.

    Returns
    -------
    out : torch.Tensor
        ``(H, Lq, Dv)`` float32, normalised over this part only.
    lse : torch.Tensor
        ``(H, Lq)`` float32, log-sum-exp of this part's scaled scores.
    """
    op = _cpu_flash_op() if q.device.type == "cpu" else None
    if op is None or v.shape[-1] != k.shape[-1]:  # the CPU kernel needs Dv == D
        return partial_attention_ref(q, k, v, scale)
    # float32 in, float32 out: the cast is a contiguous read of the part, not a gather, and
    # it keeps both the scores and this part's output unrounded.
    out, lse = op(q.float()[None], k.float()[None], v.float()[None], 0.0, False, scale=scale)
    return out[0], lse[0]


def partial_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and fallback of :func:`partial_attention`: explicit float32 softmax."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [H, Lq, Lk]
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v.float(), lse


def causal_partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``L`` tokens among themselves (query ``i`` sees keys ``<= i``),
    in float32, with its state.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``(H, L, D)``, ``(H, L, D)`` and ``(H, L, Dv)``, the same heads (repeat KV heads
        for grouped-query attention first).
    scale : float
        Softmax scale.

    Returns
    -------
    out : torch.Tensor
        ``(H, L, Dv)`` float32.
    lse : torch.Tensor
        ``(H, L)`` float32.
    """
    op = _cpu_flash_op() if q.device.type == "cpu" else None
    if op is not None and v.shape[-1] == k.shape[-1]:
        out, lse = op(q.float()[None], k.float()[None], v.float()[None], 0.0, True, scale=scale)
        return out[0], lse[0]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [H, L, L]
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v.float(), lse


def merge_attention_states(outs: Sequence[torch.Tensor],
                           lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention states of disjoint parts of the keys into the state over all of them.

    Parameters
    ----------
    outs : sequence of torch.Tensor
        ``(..., Lq, Dv)`` per part, each normalised over its own part.
    lses : sequence of torch.Tensor
        ``(..., Lq)`` per part; ``-inf`` where a query saw no key of that part (it then
        contributes nothing).

    Returns
    -------
    out : torch.Tensor
        ``(..., Lq, Dv)`` float32: the attention over the union of the parts (zeros for a
        query that saw no key at all).
    lse : torch.Tensor
        ``(..., Lq)`` float32, so merged states can be merged again.
    """
    lse = torch.stack([x.float() for x in lses])  # [P, ..., Lq]
    m = lse.amax(0)
    m = m.masked_fill(m == float("-inf"), 0.0)  # a query no part saw: avoid -inf - -inf
    w = (lse - m).exp_()
    total = w.sum(0)
    w = w.unsqueeze(-1)  # [P, ..., Lq, 1]
    out = torch.stack([o.float() for o in outs])  # [P, ..., Lq, Dv]
    # A part a query saw nothing of may hold NaN there (0/0); its weight is 0: drop it.
    out = torch.where(w > 0, out * w, 0.0).sum(0)
    out /= total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return out, m + total.log()
