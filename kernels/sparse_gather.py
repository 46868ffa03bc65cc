"""Value gather of sparse decode (reference: :func:`sgl_kvtier.sparse.ops.gather_values`).

One program per chunk copies its ``C x D`` values, ``C`` rows at a time in blocks, from the
value store straight into the chunk's workspace slots (no ``(m, C, D)`` staging buffer).
"""

import triton
import triton.language as tl


@triton.jit
def gather_values_kernel(values_ptr, heads_ptr, chunks_ptr, dest_ptr, out_ptr, chunk, head_dim,
                         stride_vh, stride_vn, stride_vc, stride_os,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[dest[i] + j] = values[heads[i], chunks[i], j]`` for ``j < C``.

    Grid ``(m,)``. ``values (H, N, C, D)``, ``out (slots, D)``, last dimensions contiguous;
    ``heads, chunks, dest (m,)`` integer.
    """
    i = tl.program_id(0)
    h = tl.load(heads_ptr + i).to(tl.int64)
    c = tl.load(chunks_ptr + i).to(tl.int64)
    first = tl.load(dest_ptr + i).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    src = values_ptr + h * stride_vh + c * stride_vn
    for j0 in range(0, chunk, BLOCK_C):
        offs_c = j0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < chunk)[:, None] & d_mask[None, :]
        v = tl.load(src + offs_c[:, None] * stride_vc + offs_d[None, :], mask=mask)
        tl.store(out_ptr + (first + offs_c)[:, None] * stride_os + offs_d[None, :],
                 v.to(out_ptr.dtype.element_ty), mask=mask)
