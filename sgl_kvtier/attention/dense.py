"""Prefix-aware dense attention in plain PyTorch (the CPU path of the kvtier backend).

SGLang's ``torch_native`` backend pads the queries of an extend up to the whole sequence
and runs a full ``seq_len x seq_len`` causal attention, so one new token after a 4k cached
prefix costs as much as the whole prompt. Here only the new tokens are queries; the mask
is causal with an offset of ``prefix_len``.

Grouped-query attention is handled by folding the query heads of a group into the query
length (``[H_q, n, D] -> [H_kv, G*n, D]``), so keys and values are never repeated.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sgl_kvtier.attention.merge import (
    causal_partial_attention,
    merge_attention_states,
    partial_attention,
)

__all__ = ["extend_attention", "decode_attention", "decode_attention_runs", "contiguous_runs",
           "extend_attention_ref"]

_CAST_CHUNK = 4096  # tokens of a run cast to float32 at a time in multi-run decode


def _fold_heads(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    # [n, H_q, D] -> [H_kv, G*n, D]; query head h belongs to KV head h // G.
    n, h_q, d = q.shape
    g = h_q // num_kv_heads
    return q.view(n, num_kv_heads, g, d).permute(1, 2, 0, 3).reshape(num_kv_heads, g * n, d)


def _unfold_heads(o: torch.Tensor, n: int) -> torch.Tensor:
    # [H_kv, G*n, Dv] -> [n, H_q, Dv]
    h_kv, gn, dv = o.shape
    g = gn // n
    return o.view(h_kv, g, n, dv).permute(2, 0, 1, 3).reshape(n, h_kv * g, dv)


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``n`` new tokens over a cached prefix plus themselves.

    Parameters
    ----------
    q : torch.Tensor
        ``(n, H_q, D)``, queries of the new tokens (positions ``prefix_len ..``).
    k, v : torch.Tensor
        ``(prefix_len + n, H_kv, D)`` and ``(prefix_len + n, H_kv, Dv)``; ``H_q`` must be
        a multiple of ``H_kv``.
    prefix_len : int
        Number of cached tokens before the first query.
    scale : float, optional
        Softmax scale; ``1/sqrt(D)`` when omitted.

    Returns
    -------
    torch.Tensor
        ``(n, H_q, Dv)``.
    """
    n, h_q, _ = q.shape
    kv_len, h_kv, _ = k.shape
    assert kv_len == prefix_len + n and h_q % h_kv == 0, (q.shape, k.shape, prefix_len)
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)
    if prefix_len == 0:
        # The same call torch_native makes for a prompt without cached prefix, so a cold
        # prefill is bit-identical to it.
        out = sdpa(q.transpose(0, 1).unsqueeze(0), kt.unsqueeze(0), vt.unsqueeze(0),
                   scale=scale, is_causal=True, enable_gqa=h_q != h_kv)
        return out.squeeze(0).transpose(0, 1)
    # Over a cached prefix: the prefix part needs no mask and the new part is a plain
    # causal square, so each takes the fast unmasked/causal kernel; their float32 states
    # merge exactly (an explicit [n, prefix+n] boolean mask sends SDPA to a slower path).
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cached = partial_attention(_fold_heads(q, h_kv), kt[:, :prefix_len], vt[:, :prefix_len],
                               scale)
    new = _causal_state(q, k[prefix_len:], v[prefix_len:], scale)
    out, _ = merge_attention_states(*zip(cached, new))
    return _unfold_heads(out.to(q.dtype), n)


def _causal_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``n`` tokens among themselves, as a float32 state in the folded
    layout of :func:`_fold_heads`: ``out (H_kv, G*n, Dv)``, ``lse (H_kv, G*n)``."""
    n, h_q, _ = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    # Repeating KV heads costs n tokens only (the new part), not the prefix.
    kr = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [H_q, n, D]
    vr = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    out, lse = causal_partial_attention(q.float().transpose(0, 1), kr, vr, scale)
    return out.reshape(h_kv, g * n, -1), lse.reshape(h_kv, g * n)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query token per request over its whole cache.

    Parameters
    ----------
    q : torch.Tensor
        ``(1, H_q, D)``.
    k, v : torch.Tensor
        ``(L, H_kv, D)`` and ``(L, H_kv, Dv)``.

    Returns
    -------
    torch.Tensor
        ``(1, H_q, Dv)``.
    """
    h_kv = k.shape[1]
    out = sdpa(_fold_heads(q, h_kv), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
    return _unfold_heads(out, 1)


def contiguous_runs(slots: torch.Tensor, max_runs: int = 8) -> list[tuple[int, int]] | None:
    """Split a request's KV slot list into ascending runs of consecutive slots.

    Parameters
    ----------
    slots : torch.Tensor
        ``(L,)`` integer slot ids in token order.
    max_runs : int
        Give up (return ``None``) beyond this many runs.

    Returns
    -------
    list of (start, end) or None
        Half-open slot ranges whose concatenation is ``slots``.
    """
    if slots.numel() == 0:
        return []
    breaks = (slots[1:] - slots[:-1] != 1).nonzero().flatten().tolist()
    if len(breaks) >= max_runs:
        return None
    starts = [0] + [b + 1 for b in breaks]
    ends = [b + 1 for b in breaks] + [slots.numel()]
    first = slots[starts].tolist()
    return [(f, f + (e - s)) for f, s, e in zip(first, starts, ends)]


def decode_attention_runs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          runs: list[tuple[int, int]], scale: float | None = None) -> torch.Tensor:
    """:func:`decode_attention` reading the KV pool in place, without gathering it.

    Parameters
    ----------
    q : torch.Tensor
        ``(1, H_q, D)``.
    k_cache, v_cache : torch.Tensor
        The whole pool, ``(slots, H_kv, D)`` and ``(slots, H_kv, Dv)``.
    runs : list of (start, end)
        The request's slots as consecutive ranges (:func:`contiguous_runs`), in token order.

    Returns
    -------
    torch.Tensor
        ``(1, H_q, Dv)``.
    """
    h_kv = k_cache.shape[1]
    qf = _fold_heads(q, h_kv)  # [H_kv, G, D]
    if len(runs) == 1:
        a, b = runs[0]
        out = sdpa(qf, k_cache[a:b].transpose(0, 1), v_cache[a:b].transpose(0, 1), scale=scale)
        return _unfold_heads(out, 1)
    # Several runs: a float32 attention state per run, read from views of the pool, merged
    # in float32 and rounded once. Rounding scores or per-run outputs to bfloat16 instead
    # made bf16 decode less exact than torch_native's one SDPA over the gathered KV.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    states = [partial_attention(qf, k_cache[a:b].transpose(0, 1), v_cache[a:b].transpose(0, 1),
                                scale)
              for run in runs for a, b in _chunks(*run)]
    out, _ = merge_attention_states(*zip(*states))  # [H_kv, G, Dv]
    return _unfold_heads(out.to(q.dtype), 1)


def _chunks(start: int, end: int, size: int = _CAST_CHUNK) -> list[tuple[int, int]]:
    # Bounds the float32 copy of a long run (a 128k-token run of 8 heads x 128 would be 1 GB).
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def extend_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                         scale: float | None = None) -> torch.Tensor:
    """Reference: explicit softmax in float32 with repeated KV heads; same shapes."""
    n, h_q, d = q.shape
    g = h_q // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [H_q, L, D]
    vf = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ kf.transpose(1, 2) * (scale or d ** -0.5)
    pos_q = torch.arange(prefix_len, prefix_len + n, device=q.device).unsqueeze(1)
    allowed = torch.arange(k.shape[0], device=q.device).unsqueeze(0) <= pos_q
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)
