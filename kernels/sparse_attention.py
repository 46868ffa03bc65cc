"""Sparse paged decode attention (reference: :func:`sgl_kvtier.sparse.paged.paged_decode_ref`).

One program per (row, split): a row (one KV head of one request) is cut into splits of
whole blocks, so that few long rows still fill the device; each program walks its part of
the row's CSR page list in blocks of tokens with an online softmax, all ``G`` query heads
of the row at once so each key and value is read once. Each split writes its output and
natural-log log-sum-exp in float32, which merge exactly (with one split, they are the
row's; an empty split writes output 0 and log-sum-exp -inf, which the merge weighs 0).
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
def _token_slots(indices_ptr, first_page, t, t_mask, page_size):
    """int64 slot ids of row-local token indices ``t`` (masked: slot 0)."""
    page = tl.load(indices_ptr + first_page + t // page_size, mask=t_mask, other=0)
    return page.to(tl.int64) * page_size + t % page_size


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, indptr_ptr, indices_ptr, last_ptr, out_ptr, lse_ptr,
                        group, head_dim, page_size, scale, span,
                        stride_qr, stride_qg, stride_ks, stride_vs, stride_or, stride_os,
                        stride_og, stride_lr, stride_ls,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Attention of row ``r``'s queries ``q[r] (G, D)`` over tokens
    ``[s*span, (s+1)*span)`` of its pages' slots.

    Grid ``(R, S)``. ``k, v (slots, D)``; ``indptr (R+1,)``, ``indices``, ``last (R,)``
    int32; ``out (R, S, G, D)`` and ``lse (R, S, G)`` float32 (strides of ``S`` may be 0
    when ``S`` is 1). Every last dimension is contiguous.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    first_page = tl.load(indptr_ptr + row)
    pages = tl.load(indptr_ptr + row + 1) - first_page
    length = tl.minimum((pages - 1) * page_size + tl.load(last_ptr + row), (split + 1) * span)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + row.to(tl.int64) * stride_qr + offs_g[:, None] * stride_qg
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32) * scale
    # Finite floor: exp(m - m_new) stays 0/1, never NaN, before the first real score.
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    denom = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    for t0 in range(split * span, length, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < length
        slot = _token_slots(indices_ptr, first_page, t, t_mask, page_size)
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        m = m_new
    out_rows = (out_ptr + row.to(tl.int64) * stride_or + split * stride_os
                + offs_g[:, None] * stride_og)
    tl.store(out_rows + offs_d[None, :], acc / tl.where(denom > 0, denom, 1.0)[:, None],
             mask=q_mask)
    tl.store(lse_ptr + row.to(tl.int64) * stride_lr + split * stride_ls + offs_g,
             m + tl.log(denom), mask=g_mask)
