"""Launchers of the sparse-decode Triton kernels (:mod:`sgl_kvtier.kernels`).

Each launcher computes what its PyTorch reference computes (named in its docstring) and
checks its arguments first, raising ``ValueError`` naming the argument: a wrong shape or
stride reaching a kernel reads or writes the wrong memory without any error.

Without CUDA the kernels run in Triton's CPU interpreter. Triton decides that when a
``@triton.jit`` decorator runs, from ``TRITON_INTERPRET``, so :func:`_kernels` (re)imports
the kernel modules with the variable set and then restores the environment: processes
started later (SGLang servers) must not inherit it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch

from sgl_kvtier.attention.merge import merge_attention_states
from sgl_kvtier.sparse.paged import PageTable
from sgl_kvtier.sparse.rope import Rotary

__all__ = ["triton_available", "interpreted", "chunk_scores_triton", "rebuild_keys_into",
           "gather_values_into", "paged_decode_triton"]

_MODULES = ("sparse_scores", "sparse_rebuild", "sparse_gather", "sparse_attention")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)
# Programs a launch aims for: an H100/H200 has 132 multiprocessors.
_TARGET_PROGRAMS = 256  # landmark scoring (heads x spans), paged decode (rows x splits)


def triton_available() -> bool:
    """Whether Triton is importable."""
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def _interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel functions, interpreted when CUDA is unavailable."""
    if not triton_available():
        raise RuntimeError("sgl_kvtier: the sparse-decode Triton kernels need triton installed")
    names = [f"sgl_kvtier.kernels.{name}" for name in _MODULES]
    if torch.cuda.is_available():
        modules = [importlib.import_module(name) for name in names]
    else:
        with _interpreter_env():
            # A module imported earlier without the variable holds compiled-mode kernels
            # that cannot launch here: decorate them again.
            modules = [importlib.reload(sys.modules[name]) if name in sys.modules
                       else importlib.import_module(name) for name in names]
    return SimpleNamespace(**{k: getattr(m, k) for m in modules for k in dir(m)
                              if k.endswith("_kernel")})


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_kernels().paged_decode_kernel, InterpretedFunction)


def _fail(message: str) -> None:
    raise ValueError(f"sparse triton launcher: {message}")


def _check(name: str, t: torch.Tensor, dim: int, dtypes: tuple, device: torch.device | None,
           last_contiguous: bool = True) -> None:
    """Rank, dtype, device (``None``: any) and a contiguous last dimension."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a tensor, got {type(t).__name__}")
    device = t.device if device is None else device
    if t.dim() != dim:
        _fail(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, expected {device}")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_launch_device(device: torch.device) -> None:
    if not interpreted() and device.type != "cuda":
        _fail(f"compiled Triton kernels need CUDA tensors, got {device}")


def _block(n: int, floor: int = 16) -> int:
    """Power-of-two tile size covering ``n`` (at least ``floor``: tl.dot's minimum)."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


def chunk_scores_triton(q: torch.Tensor, landmarks: torch.Tensor, selectable: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Triton :func:`sgl_kvtier.sparse.select.chunk_scores`.

    Parameters
    ----------
    q : torch.Tensor
        ``(H_q, D)``, ``H_q`` a multiple of ``H``.
    landmarks : torch.Tensor
        ``(H, N, D)``.
    selectable : torch.Tensor
        ``(H, N)`` bool.
    scale : float

    Returns
    -------
    torch.Tensor
        ``(H, N)`` float32 (0 where not selectable).
    """
    _check("landmarks", landmarks, 3, _FLOATS, None)
    dev = landmarks.device
    _check("q", q, 2, _FLOATS, dev)
    _check("selectable", selectable, 2, (torch.bool,), dev, last_contiguous=False)
    h, n, d = landmarks.shape
    if h == 0 or q.shape[0] % h or q.shape[1] != d:
        _fail(f"q {tuple(q.shape)} must be (G*H, D) for landmarks {tuple(landmarks.shape)}")
    if selectable.shape != (h, n):
        _fail(f"selectable {tuple(selectable.shape)} must be (H, N) = {(h, n)}")
    _check_launch_device(dev)
    out = torch.empty(h, n, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    sel = selectable.view(torch.uint8)  # same bytes; Triton loads bytes, not int1 bits
    group = q.shape[0] // h
    block_n, block_g = min(128, _block(n)), _block(group)
    # Spans of whole blocks, enough of them that H x spans programs fill the device.
    blocks = -(-n // block_n)
    spans = min(blocks, max(1, -(-_TARGET_PROGRAMS // h)))
    span = -(-blocks // spans) * block_n
    spans = -(-n // span)
    partials = torch.empty(2, h, spans, block_g, dtype=torch.float32, device=dev)
    kernels = _kernels()
    common = (n, span, group, d, float(scale), q.stride(0), landmarks.stride(0),
              landmarks.stride(1), sel.stride(0), sel.stride(1))
    # Tensor-core dot of bf16/fp16 inputs as they are; never in the interpreter, whose
    # low-precision dots are wrong.
    lowp = (q.dtype == landmarks.dtype and q.dtype in (torch.bfloat16, torch.float16)
            and not interpreted())
    blocks_meta = dict(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=_block(d), LOWP=lowp)
    kernels.chunk_partials_kernel[(h, spans)](q, landmarks, sel, partials, *common,
                                              **blocks_meta)
    kernels.chunk_scores_kernel[(h, spans)](q, landmarks, sel, partials, out, *common,
                                            out.stride(0), BLOCK_S=_block(spans, floor=2),
                                            **blocks_meta)
    return out


def _check_chunk_list(out: torch.Tensor, dest: torch.Tensor, heads: torch.Tensor,
                      chunks: torch.Tensor) -> None:
    _check("out", out, 2, _FLOATS, None)
    for name, t in (("dest", dest), ("heads", heads), ("chunks", chunks)):
        _check(name, t, 1, _INDEX, out.device, last_contiguous=False)
    if not dest.shape == heads.shape == chunks.shape:
        _fail(f"dest {tuple(dest.shape)}, heads {tuple(heads.shape)} and chunks "
              f"{tuple(chunks.shape)} must have the same length")


def rebuild_keys_into(out: torch.Tensor, dest: torch.Tensor, u: torch.Tensor, sv: torch.Tensor,
                      heads: torch.Tensor, chunks: torch.Tensor, chunk: int, start: int,
                      rotary: Rotary) -> None:
    """Triton :func:`sgl_kvtier.sparse.ops.rebuild_keys`, written into slots.

    Chunk ``i``'s ``C`` keys go to ``out[dest[i] + j]``, cast to ``out``'s dtype. Indices
    are trusted: checking them would synchronise the device.

    Parameters
    ----------
    out : torch.Tensor
        ``(slots, D)`` e.g. one layer of the workspace's keys.
    dest : torch.Tensor
        ``(m,)`` integer, first slot of each chunk.
    u, sv : torch.Tensor
        ``(M, r)`` and ``(H, r, D)`` the low-rank factors.
    heads, chunks : torch.Tensor
        ``(m,)`` integer, KV head and chunk id of each chunk.
    chunk, start : int
        Tokens per chunk ``C`` and the position of ``u``'s first row.
    rotary : Rotary
        Its ``inv_freq`` is rounded to float32 (angles are computed in float32).
    """
    _check_chunk_list(out, dest, heads, chunks)
    dev = out.device
    _check("u", u, 2, _FLOATS, dev)
    _check("sv", sv, 3, _FLOATS, dev)
    d = out.shape[1]
    if sv.shape[1] != u.shape[1] or sv.shape[2] != d:
        _fail(f"sv {tuple(sv.shape)} must be (H, r, D) for u {tuple(u.shape)}, out "
              f"{tuple(out.shape)}")
    if rotary.head_dim != d or rotary.rotary_dim > d:
        _fail(f"rotary (head_dim {rotary.head_dim}, rotary_dim {rotary.rotary_dim}) does not "
              f"fit out's D = {d}")
    if chunk < 1:
        _fail(f"chunk must be positive, got {chunk}")
    _check_launch_device(dev)
    if dest.numel() == 0:
        return
    half, rot = rotary.rotary_dim // 2, rotary.rotary_dim
    inv = rotary.inv_freq.to(device=dev, dtype=torch.float32)
    _kernels().rebuild_keys_kernel[(dest.numel(),)](
        u, sv, heads.contiguous(), chunks.contiguous(), dest.contiguous(), inv, out,
        chunk, int(start), u.shape[1], half, rot, d,
        u.stride(0), u.stride(1), sv.stride(0), sv.stride(1), out.stride(0),
        BLOCK_C=_block(chunk), BLOCK_R=32, BLOCK_HALF=_block(half),
        BLOCK_REST=_block(d - rot), HAS_REST=rot < d)


def gather_values_into(out: torch.Tensor, dest: torch.Tensor, values: torch.Tensor,
                       heads: torch.Tensor, chunks: torch.Tensor) -> None:
    """Triton :func:`sgl_kvtier.sparse.ops.gather_values`, written into slots.

    Chunk ``i``'s ``C`` values go to ``out[dest[i] + j]``, cast to ``out``'s dtype.

    Parameters
    ----------
    out : torch.Tensor
        ``(slots, D)`` e.g. one layer of the workspace's values.
    dest, heads, chunks : torch.Tensor
        ``(m,)`` integer on ``out``'s device.
    values : torch.Tensor
        ``(H, N, C, D)`` on ``out``'s device, or pinned host memory when ``out`` is on CUDA
        (read in place through unified addressing, no staging copy).
    """
    _check_chunk_list(out, dest, heads, chunks)
    host_ok = out.device.type == "cuda" and values.device.type == "cpu" and values.is_pinned()
    _check("values", values, 4, _FLOATS, values.device if host_ok else out.device)
    if values.shape[3] != out.shape[1]:
        _fail(f"values {tuple(values.shape)} and out {tuple(out.shape)} differ in D")
    _check_launch_device(out.device)
    if dest.numel() == 0:
        return
    c, d = values.shape[2], values.shape[3]
    _kernels().gather_values_kernel[(dest.numel(),)](
        values, heads.contiguous(), chunks.contiguous(), dest.contiguous(), out, c, d,
        values.stride(0), values.stride(1), values.stride(2), out.stride(0),
        BLOCK_C=_block(c, floor=1) if c <= 64 else 64, BLOCK_D=_block(d, floor=1))


def _check_table(table: PageTable, rows: int, device: torch.device) -> None:
    _check("table.indptr", table.indptr, 1, (torch.int32,), device, last_contiguous=False)
    _check("table.indices", table.indices, 1, (torch.int32,), device, last_contiguous=False)
    _check("table.last_page_len", table.last_page_len, 1, (torch.int32,), device,
           last_contiguous=False)
    if table.indptr.numel() != rows + 1 or table.last_page_len.numel() != rows:
        _fail(f"table has {table.indptr.numel() - 1} rows (last_page_len "
              f"{table.last_page_len.numel()}), q has {rows}")
    if int(table.page_size) < 1:
        _fail(f"table.page_size must be positive, got {table.page_size}")


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        table: PageTable, scale: float, min_split: int = 256
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`sgl_kvtier.sparse.paged.paged_decode_ref`.

    Parameters
    ----------
    q : torch.Tensor
        ``(R, G, D)``.
    k_cache, v_cache : torch.Tensor
        ``(slots, D)``.
    table : PageTable
        int32 arrays on ``q``'s device; every row holds at least one token.
    scale : float
    min_split : int
        Fewest tokens per split when rows are split to fill the device.

    Returns
    -------
    out : torch.Tensor
        ``(R, G, D)`` float32.
    lse : torch.Tensor
        ``(R, G)`` float32, natural log.
    """
    _check("q", q, 3, _FLOATS, None)
    dev = q.device
    _check("k_cache", k_cache, 2, _FLOATS, dev)
    _check("v_cache", v_cache, 2, _FLOATS, dev)
    r, g, d = q.shape
    if k_cache.shape[1] != d:
        _fail(f"k_cache {tuple(k_cache.shape)} must be (slots, D) with q's D = {d}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    _check_table(table, r, dev)
    _check_launch_device(dev)
    if r == 0 or g == 0:
        return (torch.empty(r, g, d, dtype=torch.float32, device=dev),
                torch.empty(r, g, dtype=torch.float32, device=dev))
    block_n = 64
    longest = table.max_len if table.max_len is not None else int(table.lengths().max())
    splits = max(1, min(-(-_TARGET_PROGRAMS // r), -(-longest // max(min_split, block_n))))
    span = -(-longest // (splits * block_n)) * block_n
    splits = -(-longest // span)
    out = torch.empty(r, splits, g, d, dtype=torch.float32, device=dev)
    lse = torch.empty(r, splits, g, dtype=torch.float32, device=dev)
    _kernels().paged_decode_kernel[(r, splits)](
        q, k_cache, v_cache, table.indptr.contiguous(), table.indices.contiguous(),
        table.last_page_len.contiguous(), out, lse, g, d, int(table.page_size), float(scale),
        span, q.stride(0), q.stride(1), k_cache.stride(0), v_cache.stride(0), out.stride(0),
        out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_G=_block(g), BLOCK_N=block_n, BLOCK_D=_block(d))
    if splits == 1:
        return out[:, 0], lse[:, 0]
    return merge_attention_states(out.unbind(1), lse.unbind(1))

