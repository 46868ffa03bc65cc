"""Landmark scoring of sparse decode (reference: :func:`sgl_kvtier.sparse.select.chunk_scores`).

The chunks of each KV head are split into spans, one program per (KV head, span), so that
a long context fills the device (16k chunks x 8 heads was 8 programs in one pass). Pass 1
(:func:`chunk_partials_kernel`) keeps, per span and query head, the running maximum and
sum of exponentials of the scaled scores. Pass 2 (:func:`chunk_scores_kernel`) combines the
spans' partials into each query head's log-sum-exp, recomputes its span's scores and writes,
per chunk, the largest softmax probability over the group. Recomputing costs one more read
of the landmarks (``N x D`` per head, small) and keeps no ``(G, N)`` buffer.

With ``LOWP`` (bf16/fp16 inputs on a GPU) the scores are one tensor-core dot of the inputs
as they are, accumulated in float32 (the products of two bf16 values are exact in float32);
otherwise both sides are upcast and multiplied in IEEE float32 (the interpreter, which
computes bf16 dots wrongly, and float32 inputs). The scale is applied after the dot.
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
def _block_logits(q, lm_head, sel_head, n0, n_end, scale, stride_ln, stride_sn, offs_d, d_mask,
                  BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    """Scaled scores ``(BLOCK_G, BLOCK_N)`` of one block of chunks (-inf where not
    selectable or past ``n_end``) and the block's ``(BLOCK_N,)`` selectable mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end
    lm = tl.load(lm_head + offs_n[:, None] * stride_ln + offs_d[None, :],
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    ok = tl.load(sel_head + offs_n * stride_sn, mask=n_mask, other=0) != 0
    if LOWP:
        s = tl.dot(q, tl.trans(lm))
    else:
        s = tl.dot(q, tl.trans(lm.to(tl.float32)), input_precision="ieee")
    return tl.where(ok[None, :], s * scale, float("-inf")), ok


@triton.jit
def _head_query(q_ptr, h, group, head_dim, stride_qh, offs_g, offs_d, LOWP: tl.constexpr):
    """The group's queries ``(BLOCK_G, BLOCK_D)`` (padding rows zero), float32 unless
    ``LOWP``."""
    mask = (offs_g < group)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + (h * group + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    return q


@triton.jit
def chunk_partials_kernel(q_ptr, lm_ptr, sel_ptr, part_ptr, n_chunks, span, group, head_dim,
                          scale, stride_qh, stride_lh, stride_ln, stride_sh, stride_sn,
                          BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          LOWP: tl.constexpr):
    """Pass 1: per (KV head ``h``, span ``j``), the running max and sum of ``exp`` of the
    scaled scores of chunks ``[j*span, (j+1)*span)``, per query head.

    Grid ``(H, S)``. ``q (H*G, D)``, ``lm (H, N, D)``, ``sel (H, N)`` uint8 (bool bits);
    ``part (2, H, S, BLOCK_G)`` float32 (max, then sum). Every last dimension is contiguous.
    """
    h = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    q = _head_query(q_ptr, h, group, head_dim, stride_qh, offs_g, offs_d, LOWP)
    lm_head = lm_ptr + h * stride_lh
    sel_head = sel_ptr + h * stride_sh
    n_end = tl.minimum(n_chunks, (j + 1) * span)
    # A finite floor: a block with nothing selectable leaves m unchanged instead of NaN.
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    denom = tl.full([BLOCK_G], 0.0, tl.float32)
    for n0 in range(j * span, n_end, BLOCK_N):
        s, ok = _block_logits(q, lm_head, sel_head, n0, n_end, scale, stride_ln, stride_sn,
                              offs_d, offs_d < head_dim, BLOCK_N, LOWP)
        m_new = tl.maximum(m, tl.reduce(s, 1, _MAX))
        denom = denom * tl.exp(m - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, _SUM)
        m = m_new
    spans = tl.num_programs(1)
    at = part_ptr + (h * spans + j) * BLOCK_G + offs_g
    tl.store(at, m)
    tl.store(at + tl.num_programs(0) * spans * BLOCK_G, denom)


@triton.jit
def chunk_scores_kernel(q_ptr, lm_ptr, sel_ptr, part_ptr, out_ptr, n_chunks, span, group,
                        head_dim, scale, stride_qh, stride_lh, stride_ln, stride_sh, stride_sn,
                        stride_oh, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, LOWP: tl.constexpr):
    """Pass 2: ``out[h, n] = max_g softmax_n(scale * q[h*G + g] . lm[h, n])`` for the
    chunks of span ``j``, the softmax's normaliser combined from every span's partials.

    Grid ``(H, S)`` as :func:`chunk_partials_kernel`; ``out (H, N)`` float32.
    """
    h = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    spans = tl.num_programs(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    at = part_ptr + (h * spans + offs_s[:, None]) * BLOCK_G + offs_g[None, :]
    s_mask = (offs_s < spans)[:, None]
    part_m = tl.load(at, mask=s_mask, other=-1e30)  # [BLOCK_S, BLOCK_G]
    part_d = tl.load(at + tl.num_programs(0) * spans * BLOCK_G, mask=s_mask, other=0.0)
    m = tl.reduce(part_m, 0, _MAX)
    lse = m + tl.log(tl.reduce(part_d * tl.exp(part_m - m[None, :]), 0, _SUM))
    q = _head_query(q_ptr, h, group, head_dim, stride_qh, offs_g, offs_d, LOWP)
    lm_head = lm_ptr + h * stride_lh
    sel_head = sel_ptr + h * stride_sh
    n_end = tl.minimum(n_chunks, (j + 1) * span)
    g_mask = offs_g < group
    for n0 in range(j * span, n_end, BLOCK_N):
        s, ok = _block_logits(q, lm_head, sel_head, n0, n_end, scale, stride_ln, stride_sn,
                              offs_d, offs_d < head_dim, BLOCK_N, LOWP)
        # Padded query rows score 0, not -inf: they must not win the max.
        p = tl.where(g_mask[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + h * stride_oh + offs_n, tl.reduce(p, 0, _MAX), mask=offs_n < n_end)
