"""The cases ``eval/sparse_gpu_bench.py`` times: each sparse-decode kernel against its PyTorch
reference, dense decode attention, and one decoder layer's matrix products.

Every kernel output that a launcher writes into a caller's buffer is poisoned with NaN first,
so a slot the kernel skipped shows as an error, not as a stale match.
"""

from __future__ import annotations

import functools
import math
import time

import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.ops import gather_values, rebuild_keys
from sgl_kvtier.sparse.paged import paged_decode, region_table
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.select import chunk_scores

__all__ = ["bench_ms", "kernel_rows", "dense_decoders", "linear_ms"]

BF16 = torch.bfloat16


def bench_ms(fn, dev: torch.device, reps: int = 50) -> float:
    """Median milliseconds of ``fn()``: CUDA events through ``triton.testing.do_bench`` on a
    GPU (device time of a launch sequence), the wall clock on a CPU."""
    if dev.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(got).all()):
        return math.inf  # NaN left by the poison: an output the kernel never wrote
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _error_text(e: Exception) -> str:
    """The exception's type, first line and last lines (a compiler's error is at the end)."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 4000 else text[:500] + "\n...\n" + text[-3500:]


def _row(kernel: str, shape: str, rel: float, ms: float, ref_ms: float, **extra) -> dict:
    return {"kernel": kernel, "shape": shape, "rel_error": rel, "ms": round(ms, 4),
            "reference_ms": round(ref_ms, 4), **extra}


def kernel_rows(dev: torch.device, s: dict, context: int, flashinfer: bool) -> list[dict]:
    """Each kernel on one layer of one request at ``context`` tokens (the attention on 8
    requests), bfloat16 inputs, against its reference on the same inputs."""
    from sgl_kvtier.sparse import triton_ops as tk

    h, g, d = s["kv_heads"], s["group"], s["head_dim"]
    plan = plan_for(SparseConfig().resolved("cuda"), context, h, d)
    c, n, k = plan.chunk, plan.chunks, plan.selected_chunks
    scale = d ** -0.5
    rows = []

    q = torch.randn(h * g, d, device=dev, dtype=BF16)
    lm = torch.randn(h, n, d, device=dev, dtype=BF16)
    sel = torch.rand(h, n, device=dev) > 0.01
    got = tk.chunk_scores_triton(q, lm, sel, scale)
    rows.append(_row("chunk_scores", f"H={h} G={g} N={n} D={d}",
                     _rel(got, chunk_scores(q, lm, sel, scale)),
                     bench_ms(lambda: tk.chunk_scores_triton(q, lm, sel, scale), dev),
                     bench_ms(lambda: chunk_scores(q, lm, sel, scale), dev)))

    rotary = Rotary(d, inv_freq(d, s["theta"]))
    u = torch.randn(plan.middle, plan.rank, device=dev, dtype=BF16) / 8
    sv = torch.randn(h, plan.rank, d, device=dev, dtype=BF16)
    heads = torch.arange(h, device=dev).repeat_interleave(k)
    chunks = torch.cat([torch.randperm(n, device=dev)[:k] for _ in range(h)])
    dest = torch.arange(h * k, device=dev) * c
    out = torch.full((h * k * c, d), float("nan"), device=dev, dtype=BF16)
    tk.rebuild_keys_into(out, dest, u, sv, heads, chunks, c, plan.sink, rotary)
    want = rebuild_keys(u, sv, heads, chunks, c, plan.sink, rotary)
    slots = (dest[:, None] + torch.arange(c, device=dev)).flatten()

    def torch_rebuild():
        out[slots] = rebuild_keys(u, sv, heads, chunks, c, plan.sink, rotary).flatten(0, 1).to(BF16)

    rows.append(_row("rebuild_keys", f"{h * k} chunks of {c}, r={plan.rank}",
                     _rel(out.view(h * k, c, d), want),
                     bench_ms(lambda: tk.rebuild_keys_into(out, dest, u, sv, heads, chunks, c,
                                                           plan.sink, rotary), dev),
                     bench_ms(torch_rebuild, dev)))

    values = torch.randn(h, n, c, d, dtype=BF16)
    values = values.pin_memory() if dev.type == "cuda" else values
    out.fill_(float("nan"))
    tk.gather_values_into(out, dest, values, heads, chunks)
    host_heads, host_chunks = heads.cpu(), chunks.cpu()
    want = gather_values(values, host_heads, host_chunks).to(dev)

    def torch_gather():
        out[slots] = gather_values(values, host_heads, host_chunks).flatten(0, 1).to(dev)

    mib = h * k * c * d * 2 / 2**20
    rows.append(_row("gather_values (pinned host)", f"{h * k} chunks of {c} ({mib:.1f} MiB)",
                     _rel(out.view(h * k, c, d), want),
                     bench_ms(lambda: tk.gather_values_into(out, dest, values, heads, chunks),
                              dev),
                     bench_ms(torch_gather, dev)))
    rows += _paged_rows(dev, plan.attended, h, g, d, flashinfer)
    return rows


def _paged_rows(dev, length: int, h: int, g: int, d: int, flashinfer: bool) -> list[dict]:
    """Paged decode over 8 requests' regions (rows = request x KV head)."""
    from sgl_kvtier.sparse.triton_ops import paged_decode_triton

    r = 8 * h
    starts = torch.randperm(r, device=dev) * length  # regions in shuffled order
    table = region_table(starts, length)
    q = torch.randn(r, g, d, device=dev, dtype=BF16)
    kc = torch.randn(r * length, d, device=dev, dtype=BF16)
    vc = torch.randn(r * length, d, device=dev, dtype=BF16)
    scale = d ** -0.5
    want, want_lse = paged_decode(q, kc, vc, table, scale)
    ref_ms = bench_ms(lambda: paged_decode(q, kc, vc, table, scale), dev)
    shape = f"{r} rows x {length} tokens, G={g}"
    got, lse = paged_decode_triton(q, kc, vc, table, scale)
    rows = [_row("paged_decode (triton)", shape, max(_rel(got, want), _rel(lse, want_lse)),
                 bench_ms(lambda: paged_decode_triton(q, kc, vc, table, scale), dev), ref_ms)]
    if flashinfer:
        try:
            from sgl_kvtier.sparse.flashinfer_decode import FlashInferDecode
            start = time.perf_counter()
            fi = FlashInferDecode(dev)
            got, lse = fi(q, kc, vc, table, scale)
            first_s = time.perf_counter() - start  # import, JIT build and first run
            rows.append(_row("paged_decode (flashinfer)", shape,
                             max(_rel(got, want), _rel(lse, want_lse)),
                             bench_ms(lambda: fi(q, kc, vc, table, scale), dev), ref_ms,
                             first_call_s=round(first_s, 1)))
        except Exception as e:  # reported, not fatal: the rest of the run still measures
            rows.append(_row("paged_decode (flashinfer)", shape, math.nan, math.nan, ref_ms,
                             error=_error_text(e)))
    return rows


@functools.cache
def _flashinfer_dense(dev: torch.device):
    import flashinfer
    buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(buf, "NHD", use_tensor_cores=False)


def dense_decoders(dev: torch.device, t: int, h: int, g: int, d: int, b: int, flashinfer: bool):
    """``(name, median ms)`` of one layer's dense decode attention for ``b`` requests of
    ``t`` tokens: PyTorch SDPA, and FlashInfer's paged decode (pages of 16) when asked."""
    kv = torch.randn(2, b, t, h, d, device=dev, dtype=BF16)
    q = torch.randn(b, h * g, d, device=dev, dtype=BF16)
    k4, v4 = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [b, H, T, D] views
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k4, v4, enable_gqa=True)
    out = [("sdpa", bench_ms(sdpa, dev, reps=20))]
    if flashinfer:
        try:
            page = 16
            wrapper = _flashinfer_dense(dev)
            pages = t // page
            indptr = (torch.arange(b + 1, device=dev) * pages).int()
            wrapper.plan(indptr, torch.arange(b * pages, device=dev).int(),
                         torch.full((b,), page, device=dev).int(), h * g, h, d, page,
                         q_data_type=BF16, kv_data_type=BF16, sm_scale=d ** -0.5)
            cache = (kv[0].view(-1, page, h, d), kv[1].view(-1, page, h, d))
            got = wrapper.run(q, cache)
            want = sdpa()[:, :, 0]
            if _rel(got, want) > 2e-2:
                raise AssertionError(f"FlashInfer dense decode differs from SDPA: "
                                     f"rel {_rel(got, want):.2e}")
            out.append(("flashinfer", bench_ms(lambda: wrapper.run(q, cache), dev, reps=20)))
        except Exception as e:
            out.append((f"flashinfer failed: {_error_text(e).splitlines()[-1][:200]}", math.nan))
    return out


_LINEAR_MS: dict = {}


def linear_ms(dev: torch.device, s: dict, b: int) -> float:
    """One decoder layer's projections and MLP at batch ``b`` (random weights of the
    model's shapes), plus the LM head's share per layer, median ms."""
    key = (dev.type, b)
    if key in _LINEAR_MS:
        return _LINEAR_MS[key]
    hid, inter, hq = s["hidden"], s["inter"], s["kv_heads"] * s["group"] * s["head_dim"]
    kv = 2 * s["kv_heads"] * s["head_dim"]
    w = {name: torch.randn(*shape, device=dev, dtype=BF16) / 64 for name, shape in
         (("qkv", (hid, hq + kv)), ("o", (hq, hid)), ("gu", (hid, 2 * inter)),
          ("down", (inter, hid)), ("head", (hid, s["vocab"])))}
    x = torch.randn(b, hid, device=dev, dtype=BF16)

    def layer():
        a = (x @ w["qkv"])[:, :hq] @ w["o"]
        gu = a @ w["gu"]
        return (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w["down"]

    ms = bench_ms(layer, dev) + bench_ms(lambda: x @ w["head"], dev) / s["layers"]
    _LINEAR_MS[key] = ms

    return ms
