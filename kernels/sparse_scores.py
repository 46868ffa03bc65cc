"""Landmark scoring of sparse decode (reference: :func:`sgl_kvtier.sparse.select.chunk_scores`).

One program per KV head. Pass 1 streams the head's landmarks in blocks of chunks and keeps
an online log-sum-exp per query head of the group; pass 2 streams them again and writes, per
chunk, the largest softmax probability over the group. Recomputing the scores costs one
more read of the landmarks (``N x D`` per head, small) and keeps no ``(G, N)`` buffer.
"""

import triton
import triton.language as tl

# Reductions name the standard combine functions instead of calling tl.max / tl.sum (and
# tl.full instead of tl.zeros): those are @triton.jit library functions, which cannot run
# inside an interpreted kernel when Triton itself was imported without TRITON_INTERPRET.
# The interpreter recognises these combine functions and reduces with NumPy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _block_logits(q, lm_head, sel_head, n0, n_chunks, stride_ln, stride_sn, offs_d, d_mask,
                  BLOCK_N: tl.constexpr):
    """Scaled scores ``(BLOCK_G, BLOCK_N)`` of one block of chunks (-inf where not
    selectable or past the end) and the block's ``(BLOCK_N,)`` selectable mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_chunks
    lm = tl.load(lm_head + offs_n[:, None] * stride_ln + offs_d[None, :],
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    ok = tl.load(sel_head + offs_n * stride_sn, mask=n_mask, other=0) != 0
    s = tl.dot(q, tl.trans(lm), input_precision="ieee")
    return tl.where(ok[None, :], s, float("-inf")), ok


@triton.jit
def chunk_scores_kernel(q_ptr, lm_ptr, sel_ptr, out_ptr, n_chunks, group, head_dim, scale,
                        stride_qh, stride_lh, stride_ln, stride_sh, stride_sn, stride_oh,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[h, n] = max_g softmax_n(scale * q[h*G + g] . lm[h, n])`` over selectable ``n``.

    Grid ``(H,)``. ``q (H*G, D)``, ``lm (H, N, D)``, ``sel (H, N)`` uint8 (bool bits),
    ``out (H, N)`` float32; every last dimension is contiguous.
    """
    h = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q = tl.load(q_ptr + (h * group + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale
    lm_head = lm_ptr + h * stride_lh
    sel_head = sel_ptr + h * stride_sh
    # A finite floor: a block with nothing selectable leaves m unchanged instead of NaN.
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    denom = tl.full([BLOCK_G], 0.0, tl.float32)
    for n0 in range(0, n_chunks, BLOCK_N):
        s, ok = _block_logits(q, lm_head, sel_head, n0, n_chunks, stride_ln, stride_sn,
                              offs_d, d_mask, BLOCK_N)
        m_new = tl.maximum(m, tl.reduce(s, 1, _MAX))
        denom = denom * tl.exp(m - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, _SUM)
        m = m_new
    lse = m + tl.log(denom)
    for n0 in range(0, n_chunks, BLOCK_N):
        s, ok = _block_logits(q, lm_head, sel_head, n0, n_chunks, stride_ln, stride_sn,
                              offs_d, d_mask, BLOCK_N)
        # Padded query rows score 0, not -inf: they must not win the max.
        p = tl.where(g_mask[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + h * stride_oh + offs_n, tl.reduce(p, 0, _MAX), mask=offs_n < n_chunks)
