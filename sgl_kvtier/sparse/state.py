"""The sparse state of one prompt in one layer: what decode keeps instead of its KV.

Built once after prefill from the layer's post-RoPE keys and values (what the KV pool
holds). The prompt splits into ``[sink | middle | local]`` (:class:`SparsePlan`); the state
covers the sink and the middle, which prompts with the same document share; the local
window (where prompts differ: the question) belongs to each request. The state keeps, per
layer:

- on the device: the sink's K/V; the middle's pre-RoPE keys as joint low-rank factors
  ``U (M, r)`` (shared by the KV heads) and ``SV (H_kv, r, D)``; one landmark per chunk and
  KV head (mean post-RoPE key); the outlier chunks' K/V, dense;
- off the device (host memory): the middle's values, one contiguous row per chunk and head.

With ``keys: exact`` (``plan.exact_keys``) the middle's post-RoPE keys are kept off the
device beside the values, in the same layout, instead of the factors.

The KV heads of the layer named in ``sparse.exact_score_heads`` also keep their middle's
post-RoPE keys on the device, to score chunks exactly
(:func:`~sgl_kvtier.sparse.select.exact_scores`).

The state is immutable once built, so requests with the same prompt prefix share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sgl_kvtier.sparse.budget import SparsePlan
from sgl_kvtier.sparse.rope import Rotary

__all__ = ["LayerState", "HOST_BUFFERS", "build_layer_state", "outlier_chunks",
           "low_rank_keys"]


@dataclass(frozen=True)
class LayerState:
    """One layer's sparse state (shapes: ``H`` KV heads, ``N`` chunks of ``C``, ``M = N*C``).

    Attributes
    ----------
    sink_k, sink_v : torch.Tensor
        ``(H, S, D)`` post-RoPE keys and values of the first ``S`` tokens.
    u : torch.Tensor
        ``(M, r)`` left factor of the middle's pre-RoPE keys, shared by the heads
        (``r = 0`` with exact keys).
    sv : torch.Tensor
        ``(H, r, D)`` right factor: ``k_pre[t, h] ~= u[t] @ sv[h]``.
    landmarks : torch.Tensor
        ``(H, N, D)`` mean post-RoPE key of each chunk.
    selectable : torch.Tensor
        ``(H, N)`` bool, False for the head's outlier chunks (attended densely instead).
    outlier_ids : torch.Tensor
        ``(H, O)`` int64 chunk ids, ascending.
    outlier_k, outlier_v : torch.Tensor
        ``(H, O*C, D)`` their post-RoPE keys and values.
    values : torch.Tensor
        ``(H, N, C, D)`` the middle's values, in host memory.
    start : int
        Position of the middle's first token (``S``).
    bounds : torch.Tensor or None
        ``(2, H, N, D)`` per chunk, the smallest and largest post-RoPE key per dimension
        (for ``selection: bound``; None otherwise).
    keys : torch.Tensor or None
        ``(H, N, C, D)`` the middle's post-RoPE keys beside ``values`` (``keys: exact``;
        None with low-rank keys).
    exact_heads : torch.Tensor or None
        ``(E,)`` int64, ascending: the KV heads scored from their exact keys (None: none).
    exact_keys : torch.Tensor or None
        ``(E, N, C, D)`` those heads' middle post-RoPE keys, on the device.
    """

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    u: torch.Tensor
    sv: torch.Tensor
    landmarks: torch.Tensor
    selectable: torch.Tensor
    outlier_ids: torch.Tensor
    outlier_k: torch.Tensor
    outlier_v: torch.Tensor
    values: torch.Tensor
    start: int
    bounds: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    exact_heads: torch.Tensor | None = None
    exact_keys: torch.Tensor | None = None

    def nbytes(self) -> dict[str, int]:
        """Bytes per buffer; those named in :data:`HOST_BUFFERS` are the host side, the
        rest the device side."""
        names = ("sink_k", "sink_v", "u", "sv", "landmarks", "selectable", "outlier_ids",
                 "outlier_k", "outlier_v", "values", "bounds", "keys", "exact_heads",
                 "exact_keys")
        return {name: _bytes(t) for name in names if (t := getattr(self, name)) is not None}

    def host_bytes(self) -> int:
        return sum(n for name, n in self.nbytes().items() if name in HOST_BUFFERS)


HOST_BUFFERS = ("values", "keys")


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build_layer_state(k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, rotary: Rotary,
                      device: torch.device | str | None = None,
                      host: torch.device | str = "cpu", bounds: bool = False,
                      exact_heads: Sequence[int] = ()) -> LayerState:
    """Build one layer's state from the prompt's post-RoPE keys and values.

    Parameters
    ----------
    k, v : torch.Tensor
        ``(T, H, D)`` with ``T >= plan.shared``; token ``t`` is at position ``t`` (only
        the first ``plan.shared`` tokens are read).
    plan : SparsePlan
        Sizes from :func:`sgl_kvtier.sparse.budget.plan_for`.
    rotary : Rotary
        The model's rotation, to recover the pre-RoPE keys.
    device, host : torch.device or str
        Where the device-side buffers and the values go (default: ``k``'s device, CPU).
    bounds : bool
        Also keep each chunk's per-dimension key min and max (``selection: bound``).
    exact_heads : sequence of int
        KV heads whose chunks are scored from their exact keys (kept on the device).

    Returns
    -------
    LayerState
        Buffers in ``k``'s dtype, except the float32-computed factors rounded to it.
    """
    device = k.device if device is None else torch.device(device)
    s, m, c = plan.sink, plan.middle, plan.chunk
    h, d = k.shape[1], k.shape[2]
    k_mid, v_mid = k[s:s + m], v[s:s + m]
    if plan.exact_keys:  # no factors (shapes kept, so H reads the same everywhere)
        u, sv = k.new_zeros(m, 0, dtype=torch.float32), k.new_zeros(h, 0, d, dtype=torch.float32)
    else:
        positions = torch.arange(s, s + m, device=k.device)
        u, sv = low_rank_keys(rotary.invert(k_mid, positions), plan.rank)
    chunks = k_mid.float().view(plan.chunks, c, h, d)
    landmarks = chunks.mean(1).transpose(0, 1)  # [H, N, D]
    ids = outlier_chunks(chunks, plan.outlier_chunks)  # [H, O]
    selectable = torch.ones(h, plan.chunks, dtype=torch.bool, device=k.device)
    selectable.scatter_(1, ids, False)
    per_head = k_mid.view(plan.chunks, c, h, d).permute(2, 0, 1, 3)  # [H, N, C, D]
    values = v_mid.view(plan.chunks, c, h, d).permute(2, 0, 1, 3)
    out_k = _take_chunks(per_head, ids)
    out_v = _take_chunks(values, ids)
    dev = lambda t: t.to(device=device, dtype=k.dtype).contiguous()
    return LayerState(
        sink_k=dev(k[:s].transpose(0, 1)), sink_v=dev(v[:s].transpose(0, 1)),
        u=dev(u), sv=dev(sv), landmarks=dev(landmarks), selectable=selectable.to(device),
        outlier_ids=ids.to(device), outlier_k=dev(out_k), outlier_v=dev(out_v),
        values=_to_host(values, host), start=s,
        bounds=dev(torch.stack([chunks.amin(1), chunks.amax(1)]).transpose(1, 2))
        if bounds else None,
        keys=_to_host(per_head, host) if plan.exact_keys else None,
        **_exact(per_head, exact_heads, device))


def _exact(per_head: torch.Tensor, heads: Sequence[int], device: torch.device) -> dict:
    # per_head [H, N, C, D] -> the named heads' keys on the device, ids ascending
    if not heads:
        return {}
    ids = torch.tensor(sorted(set(heads)), dtype=torch.long, device=per_head.device)
    return {"exact_heads": ids.to(device), "exact_keys": per_head[ids].to(device).contiguous()}


def _to_host(t: torch.Tensor, host: torch.device | str) -> torch.Tensor:
    # Pinned where a GPU reads it in place (the Triton fetch) or copies it asynchronously.
    out = t.to(host).contiguous()
    if torch.device(host).type == "cpu" and torch.cuda.is_available():
        out = out.pin_memory()
    return out


def low_rank_keys(k_pre: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint rank-``r`` factors of pre-RoPE keys across KV heads (truncated SVD, float32).

    Parameters
    ----------
    k_pre : torch.Tensor
        ``(M, H, D)``.

    Returns
    -------
    u : torch.Tensor
        ``(M, r)`` float32.
    sv : torch.Tensor
        ``(H, r, D)`` float32, so that ``k_pre[:, h] ~= u @ sv[h]``.
    """
    m, h, d = k_pre.shape
    u, s, vh = torch.linalg.svd(k_pre.reshape(m, h * d).float(), full_matrices=False)
    sv = (s[:rank, None] * vh[:rank]).view(rank, h, d).transpose(0, 1)
    return u[:, :rank].contiguous(), sv.contiguous()


def outlier_chunks(chunks: torch.Tensor, count: int) -> torch.Tensor:
    """Per KV head, the ``count`` chunks whose keys are least like their mean.

    A chunk's score is the smallest cosine similarity between one of its keys and the
    chunk's mean key: a landmark stands for its chunk only when every key points its way.

    Parameters
    ----------
    chunks : torch.Tensor
        ``(N, C, H, D)`` post-RoPE keys by chunk.

    Returns
    -------
    torch.Tensor
        ``(H, count)`` int64 chunk ids, ascending.
    """
    mean = chunks.mean(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(chunks, mean.expand_as(chunks), dim=-1)
    score = cos.amin(1).transpose(0, 1)  # [H, N]
    ids = score.topk(count, dim=1, largest=False).indices
    return ids.sort(dim=1).values


def _take_chunks(per_head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # per_head [H, N, C, D], ids [H, O] -> [H, O*C, D]
    h, _, c, d = per_head.shape
    index = ids[:, :, None, None].expand(h, ids.shape[1], c, d)
    return per_head.gather(1, index).reshape(h, -1, d)
