"""PyTorch references of the per-step sparse-decode operations that have Triton kernels.

Each takes a flat list of ``m`` (KV head, chunk) pairs, the chunks that were not in the
workspace last step, and returns their tokens in that order, ``C`` per chunk. The Triton
kernels in :mod:`sgl_kvtier.kernels` compute the same values and write them straight into
the workspace slots; ``tests/unit/sparse/test_kernels.py`` checks that they agree.
"""

from __future__ import annotations

import torch

from sgl_kvtier.sparse.rope import Rotary

__all__ = ["rebuild_keys", "gather_values", "chunk_positions"]


def chunk_positions(chunks: torch.Tensor, chunk: int, start: int) -> torch.Tensor:
    """Token positions of ``chunks (m,)``: ``(m, C)`` int64."""
    return start + chunks[:, None] * chunk + torch.arange(chunk, device=chunks.device)


def rebuild_keys(u: torch.Tensor, sv: torch.Tensor, heads: torch.Tensor, chunks: torch.Tensor,
                 chunk: int, start: int, rotary: Rotary) -> torch.Tensor:
    """Post-RoPE keys of whole chunks, rebuilt from the low-rank pre-RoPE factors.

    Parameters
    ----------
    u : torch.Tensor
        ``(M, r)`` left factor (token ``t`` of the middle is at position ``start + t``).
    sv : torch.Tensor
        ``(H, r, D)`` right factor.
    heads, chunks : torch.Tensor
        ``(m,)`` int64 each: the KV head and chunk id of each chunk to rebuild.
    chunk : int
        Tokens per chunk ``C``.

    Returns
    -------
    torch.Tensor
        ``(m, C, D)`` float32, rotated to each token's original position.
    """
    m, r = heads.numel(), u.shape[-1]
    rows = (chunks[:, None] * chunk + torch.arange(chunk, device=u.device)).flatten()
    x = u.index_select(0, rows).view(m, chunk, r).float()  # [m, C, r]
    out = torch.bmm(x, sv.index_select(0, heads).float())  # [m, C, D]
    return rotary.apply(out, chunk_positions(chunks, chunk, start))


def gather_values(values: torch.Tensor, heads: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """Values of whole chunks from the host store.

    Parameters
    ----------
    values : torch.Tensor
        ``(H, N, C, D)`` (host memory).
    heads, chunks : torch.Tensor
        ``(m,)`` int64 each, on ``values``' device.

    Returns
    -------
    torch.Tensor
        ``(m, C, D)`` in ``values``' dtype and device.
    """
    return values[heads, chunks]
