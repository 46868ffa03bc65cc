"""Key rebuild of sparse decode (reference: :func:`sgl_kvtier.sparse.ops.rebuild_keys`).

One program per chunk: its ``C`` pre-RoPE keys are ``u[rows] @ sv[h]``, accumulated over the
rank in blocks, then rotated to the tokens' positions and written into the chunk's workspace
slots. The product is computed as three column groups of ``sv`` (the two rotary halves and
the unrotated rest), so the neox rotation pairs whole tiles instead of shuffling columns.
"""

import triton
import triton.language as tl


@triton.jit
def _columns(u_rows, c_mask, rank, stride_ur, sv_head, stride_sr, cols, col_mask,
             BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """``(BLOCK_C, BLOCK_W)`` float32: ``u[rows] @ sv[h][:, cols]``, summed over the rank."""
    # tl.full, not tl.zeros: a @triton.jit library function, see sparse_scores.py.
    acc = tl.full([BLOCK_C, BLOCK_W], 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        u = tl.load(u_rows + offs_r[None, :] * stride_ur,
                    mask=c_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        sv = tl.load(sv_head + offs_r[:, None] * stride_sr + cols[None, :],
                     mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(u, sv, acc, input_precision="ieee")
    return acc


@triton.jit
def rebuild_keys_kernel(u_ptr, sv_ptr, heads_ptr, chunks_ptr, dest_ptr, inv_freq_ptr, out_ptr,
                        chunk, start, rank, half, rotary_dim, head_dim,
                        stride_um, stride_ur, stride_sh, stride_sr, stride_os,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                        HAS_REST: tl.constexpr):
    """``out[dest[i] + j] = rope(u[chunks[i]*C + j] @ sv[heads[i]], start + chunks[i]*C + j)``.

    Grid ``(m,)``. ``u (M, r)``, ``sv (H, r, D)`` (last dimension contiguous),
    ``inv_freq (half,)`` float32, ``out (slots, D)``. Dimensions ``[0, half)`` and
    ``[half, rotary_dim)`` pair up (neox layout); ``[rotary_dim, D)`` pass through.
    """
    i = tl.program_id(0)
    h = tl.load(heads_ptr + i).to(tl.int64)
    c = tl.load(chunks_ptr + i).to(tl.int64)
    first = tl.load(dest_ptr + i).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < chunk
    token = c * chunk + offs_c
    u_rows = u_ptr + token[:, None] * stride_um
    sv_head = sv_ptr + h * stride_sh
    offs_h = tl.arange(0, BLOCK_HALF)
    h_mask = offs_h < half
    a = _columns(u_rows, c_mask, rank, stride_ur, sv_head, stride_sr, offs_h, h_mask,
                 BLOCK_C, BLOCK_R, BLOCK_HALF)
    b = _columns(u_rows, c_mask, rank, stride_ur, sv_head, stride_sr, half + offs_h, h_mask,
                 BLOCK_C, BLOCK_R, BLOCK_HALF)
    # float32 angles, as SGLang's own cos/sin cache computes them.
    pos = (start + token).to(tl.float32)
    inv = tl.load(inv_freq_ptr + offs_h, mask=h_mask, other=0.0)
    angle = pos[:, None] * inv[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    out_rows = out_ptr + (first + offs_c)[:, None] * stride_os
    mask = c_mask[:, None] & h_mask[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_rows + offs_h[None, :], (a * cos - b * sin).to(dtype), mask=mask)
    tl.store(out_rows + (half + offs_h)[None, :], (b * cos + a * sin).to(dtype), mask=mask)
    if HAS_REST:
        offs_p = rotary_dim + tl.arange(0, BLOCK_REST)
        p_mask = offs_p < head_dim
        rest = _columns(u_rows, c_mask, rank, stride_ur, sv_head, stride_sr, offs_p, p_mask,
                        BLOCK_C, BLOCK_R, BLOCK_REST)
        tl.store(out_rows + offs_p[None, :], rest.to(dtype), mask=c_mask[:, None] & p_mask[None, :])
