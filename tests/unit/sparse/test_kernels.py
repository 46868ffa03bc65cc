"""The sparse-decode Triton kernels against their PyTorch references.

Without CUDA they run in Triton's CPU interpreter (programs one after another, so shapes
stay small). The references read the same inputs, bf16 included: both sides upcast to
float32, so only the output's rounding differs.
"""

import os
import re
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse import triton_ops
from sgl_kvtier.sparse.backend import resolve_ops
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.decode import SparseStep
from sgl_kvtier.sparse.ops import gather_values, rebuild_keys
from sgl_kvtier.sparse.paged import PageTable, paged_decode, paged_decode_ref
from sgl_kvtier.sparse.request import SparseRequest
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.select import chunk_scores
from sgl_kvtier.sparse.state import build_layer_state
from sgl_kvtier.sparse.step_ops import TorchOps, TritonOps
from sgl_kvtier.sparse.triton_ops import (
    chunk_scores_triton,
    gather_values_into,
    interpreted,
    paged_decode_triton,
    rebuild_keys_into,
)
from sgl_kvtier.sparse.workspace import SparseWorkspace

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16
F32 = torch.float32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=F32, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(device=DEV, dtype=dtype)


def _strided(t, stretch):
    """The same values with a row stride ``stretch`` times the last dimension's size."""
    if stretch == 1:
        return t
    big = torch.zeros(*t.shape[:-1], stretch * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., :t.shape[-1]] = t
    return big[..., :t.shape[-1]]


def test_kernels_import_interpreted_without_leaving_the_variable_set():
    before = os.environ.get("TRITON_INTERPRET")
    triton_ops._kernels.cache_clear()  # a fresh (re)import, as the first launch does
    assert interpreted() == (not torch.cuda.is_available())
    assert os.environ.get("TRITON_INTERPRET") == before  # server subprocesses inherit it


@pytest.mark.parametrize("h,g,d,n,dtype,stretch", [
    (3, 3, 64, 50, F32, 1), (2, 4, 128, 37, F32, 2), (3, 3, 64, 200, BF16, 2),
    (2, 4, 64, 1000, F32, 1)])
def test_chunk_scores(h, g, d, n, dtype, stretch, monkeypatch):
    """Long heads are split into spans of 128 chunks scored in parallel (8 at n=1000): the
    softmax must still normalise over all of them, and a span with nothing selectable
    (chunks 256..383 of head 0 at n=1000) must not disturb it."""
    grids = _record_grids(monkeypatch, "chunk_partials_kernel")
    gen = _gen(n)
    q = _strided(_randn(h * g, d, gen=gen, dtype=dtype), stretch)
    landmarks = _strided(_randn(h, n, d, gen=gen, dtype=dtype, scale=2.0), stretch)
    selectable = (torch.rand(h, 2 * n, generator=gen) > 0.3).to(DEV)[:, ::2]
    if n > 384:
        selectable[0, 256:384] = False
    got = chunk_scores_triton(q, landmarks, selectable, d ** -0.5)
    want = chunk_scores(q, landmarks, selectable, d ** -0.5)
    assert got.dtype == F32 and got.shape == (h, n)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got[~selectable] == 0).all()
    assert grids == [(h, {50: 1, 37: 1, 200: 2, 1000: 8}[n])]  # the spans really ran


def _record_grids(monkeypatch, name):
    """Record the launch grids of kernel ``name`` (launches go through ``kernel[grid]``)."""
    grids, kernels, mode = [], triton_ops._kernels(), interpreted()

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return getattr(kernels, name)[grid]

    patched = types.SimpleNamespace(**vars(kernels))
    setattr(patched, name, Recorder())
    monkeypatch.setattr(triton_ops, "_kernels", lambda: patched)
    monkeypatch.setattr(triton_ops, "interpreted", lambda: mode)  # it inspects the kernel
    return grids


# Compiles every kernel for sm_90 (Triton's bundled ptxas, no GPU needed): the interpreter
# skips the GPU compiler's checks (tl.dot shapes, layouts, globals). A subprocess, because
# the kernel modules in this process are decorated for the interpreter.
_COMPILE = """
import importlib
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
ptrs = {"sel_ptr": "*u8", "heads_ptr": "*i64", "chunks_ptr": "*i64", "dest_ptr": "*i64",
        "indptr_ptr": "*i32", "indices_ptr": "*i32", "last_ptr": "*i32", "lse_ptr": "*fp32",
        "inv_freq_ptr": "*fp32", "part_ptr": "*fp32"}
blocks = dict(BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, BLOCK_C=16, BLOCK_R=32, BLOCK_HALF=32,
              BLOCK_REST=64, HAS_REST=True, BLOCK_S=16, LOWP=True)
for name in ("scores", "rebuild", "gather", "attention"):
    module = importlib.import_module("sgl_kvtier.kernels.sparse_" + name)
    for fn in (getattr(module, k) for k in dir(module) if k.endswith("_kernel")):
        consts = {a: blocks[a] for a in fn.arg_names if a in blocks}
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr")
               else "fp32" if a == "scale" else "i32" for a in fn.arg_names}
        compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        print(fn.__name__, "compiled")
"""


def test_kernels_compile_for_hopper():
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 5, run.stdout  # scores has two passes


def _chunk_list(h, n_chunks, m, gen):
    heads = torch.randint(0, h, (m,), generator=gen)
    chunks = torch.randint(0, n_chunks, (m,), generator=gen)
    return heads.to(DEV), chunks.to(DEV)


def _spread(out, dest, c):
    """``(m, C, D)`` of the chunks written at ``dest``."""
    return torch.stack([out[s:s + c] for s in dest.tolist()])


def _untouched(out, dest, c, fill):
    keep = torch.ones(out.shape[0], dtype=torch.bool)
    for s in dest.tolist():
        keep[s:s + c] = False
    return bool((out[keep.to(out.device)] == fill).all())


@pytest.mark.parametrize("d,rot,rank,c,start,dtypes", [
    (64, 64, 48, 8, 16, (F32, F32)),      # small positions: float32 angles are tight
    (128, 128, 40, 5, 3, (BF16, F32)),    # bf16 factors, odd chunk and rank
    (64, 32, 33, 8, 7, (F32, BF16)),      # partial rotary, bf16 slots
])
def test_rebuild_keys(d, rot, rank, c, start, dtypes):
    gen = _gen(rank)
    h, n, m = 3, 12, 7
    rotary = Rotary(d, inv_freq(rot, 10000.0))
    u = _strided(_randn(n * c, rank, gen=gen, dtype=dtypes[0]), 2)
    sv = _randn(h, rank, d, gen=gen, dtype=dtypes[0], scale=0.3)
    heads, chunks = _chunk_list(h, n, m, gen)
    slots = torch.full((2, m * c + 20, d), 7.0, dtype=dtypes[1], device=DEV)
    out = slots[1]  # a layer of a workspace buffer
    dest = (torch.randperm(m, generator=gen) * c + 3).to(DEV)
    rebuild_keys_into(out, dest, u, sv, heads, chunks, c, start, rotary)
    want = rebuild_keys(u, sv, heads, chunks, c, start, rotary)
    got = _spread(out, dest, c).float()
    if dtypes[1] == BF16:  # the interpreter truncates to bf16: one ulp
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _untouched(out, dest, c, 7.0) and (slots[0] == 7.0).all()


def test_rebuild_keys_at_long_context_positions():
    """Positions near 128k: the kernel's float32 angles (as SGLang's cos/sin cache) differ
    from the float64 reference by up to about one float32 ulp of the angle."""
    gen = _gen(5)
    d, c, rank, h, n = 64, 8, 32, 3, 16
    rotary = Rotary(d, inv_freq(d, 500000.0))
    u, sv = _randn(n * c, rank, gen=gen), _randn(h, rank, d, gen=gen, scale=0.3)
    heads, chunks = _chunk_list(h, n, 9, gen)
    out = torch.zeros(9 * c, d, device=DEV)
    dest = torch.arange(9, device=DEV) * c
    start = 131072 - n * c
    rebuild_keys_into(out, dest, u, sv, heads, chunks, c, start, rotary)
    want = rebuild_keys(u, sv, heads, chunks, c, start, rotary)
    err = (_spread(out, dest, c) - want).abs().max()
    assert err < 0.01 * want.abs().max(), err  # measured 0.0035


@pytest.mark.parametrize("c,dtypes,stretch", [
    (8, (F32, F32), 1), (5, (BF16, BF16), 2), (8, (BF16, F32), 2)])
def test_gather_values(c, dtypes, stretch):
    gen = _gen(c)
    h, n, d, m = 3, 10, 64, 6
    values = _strided(_randn(h, n, c, d, gen=gen, dtype=dtypes[0]), stretch)
    heads, chunks = _chunk_list(h, n, m, gen)
    out = torch.full((m * c + 9, d), -3.0, dtype=dtypes[1], device=DEV)
    dest = (torch.randperm(m, generator=gen) * c + 1).to(DEV)
    gather_values_into(out, dest, values, heads, chunks)
    want = gather_values(values, heads, chunks).to(dtypes[1])
    assert torch.equal(_spread(out, dest, c), want)  # a copy, exact
    assert _untouched(out, dest, c, -3.0)


def _random_table(lengths, page_size, gen):
    """Rows of ``lengths`` tokens on distinct pages in shuffled order."""
    pages = [-(-n // page_size) for n in lengths]
    ids = torch.randperm(sum(pages) + 5, generator=gen)[:sum(pages)]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()])
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lengths, pages)])
    table = PageTable(indptr.int().to(DEV), ids.int().to(DEV), last.int().to(DEV), page_size)
    return table, (sum(pages) + 5) * page_size


@pytest.mark.parametrize("g,d,page,dtype,stretch,split", [
    (3, 64, 1, F32, 1, 256), (3, 64, 8, BF16, 2, 256), (4, 128, 8, F32, 2, 256),
    (16, 64, 1, F32, 1, 256), (3, 64, 1, F32, 1, 64), (4, 64, 8, BF16, 1, 64)])
def test_paged_decode(g, d, page, dtype, stretch, split, monkeypatch):
    """With ``split`` 64 the rows are cut into splits of 64 tokens (3 for the longest row
    of 129; rows of 1 and 8 tokens leave two splits empty), merged after the kernel."""
    grids = _record_grids(monkeypatch, "paged_decode_kernel")
    gen = _gen(g * page)
    lengths = [1, 70, 129, 8, 13]
    table, slots = _random_table(lengths, page, gen)
    assert table.lengths().tolist() == lengths
    q = _strided(_randn(len(lengths), g, d, gen=gen, dtype=dtype, scale=2.0), stretch)
    k = _strided(_randn(2, slots, d, gen=gen, dtype=dtype), stretch)[1]
    v = _randn(slots, d, gen=gen, dtype=dtype)
    out, lse = paged_decode_triton(q, k, v, table, d ** -0.5, min_split=split)
    assert grids == [(len(lengths), 3 if split == 64 else 1)]  # the splits really ran
    want, want_lse = paged_decode_ref(q, k, v, table, d ** -0.5)
    assert out.dtype == lse.dtype == F32
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)


def test_launchers_name_the_bad_argument():
    gen = _gen(0)
    q, lm = _randn(6, 64, gen=gen), _randn(3, 10, 64, gen=gen)
    sel = torch.ones(3, 10, dtype=torch.bool, device=DEV)
    out, idx = torch.zeros(40, 64, device=DEV), torch.zeros(2, dtype=torch.long, device=DEV)
    rotary = Rotary(64, inv_freq(64, 10000.0))
    u, sv = _randn(80, 16, gen=gen), _randn(3, 16, 64, gen=gen)
    values = _randn(3, 10, 8, 64, gen=gen)
    table, slots = _random_table([3, 5], 2, gen)
    kv = _randn(slots, 64, gen=gen)
    qr = _randn(2, 4, 64, gen=gen)
    cases = [
        ("q", lambda: chunk_scores_triton(q[:5], lm, sel, 1.0)),
        ("selectable", lambda: chunk_scores_triton(q, lm, sel[:, :9], 1.0)),
        ("landmarks", lambda: chunk_scores_triton(q, lm.transpose(1, 2), sel, 1.0)),
        ("out", lambda: rebuild_keys_into(out.t(), idx, u, sv, idx, idx, 8, 0, rotary)),
        ("heads", lambda: rebuild_keys_into(out, idx, u, sv, idx.float(), idx, 8, 0, rotary)),
        ("sv", lambda: rebuild_keys_into(out, idx, u, sv[:, :8], idx, idx, 8, 0, rotary)),
        ("rotary", lambda: rebuild_keys_into(out[:, :32], idx, u, sv[..., :32], idx, idx, 8, 0,
                                             rotary)),
        ("dest", lambda: gather_values_into(out, idx[:1], values, idx, idx)),
        ("values", lambda: gather_values_into(out, idx, values[0], idx, idx)),
        ("k_cache", lambda: paged_decode_triton(qr, kv.int(), kv, table, 1.0)),
        ("v_cache", lambda: paged_decode_triton(qr, kv, kv[:, :32], table, 1.0)),
        ("table.indptr", lambda: paged_decode_triton(
            qr, kv, kv, PageTable(table.indptr.long(), table.indices, table.last_page_len, 2),
            1.0)),
        ("table", lambda: paged_decode_triton(qr[:1], kv, kv, table, 1.0)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"launcher: {re.escape(name)}\b"):
            call()


def _prompt(t, h, d, rotary, gen):
    basis = torch.randn(8, h * d, generator=gen)
    k_pre = (torch.randn(t, 8, generator=gen) @ basis).view(t, h, d)
    k_pre += 0.05 * torch.randn(t, h, d, generator=gen)
    return rotary.apply(k_pre, torch.arange(t)), torch.randn(t, h, d, generator=gen)


@pytest.mark.parametrize("keys", ["lowrank", "exact"])
def test_sparse_step_with_all_four_kernels(keys):
    h, g, d, layers = 3, 3, 64, 2
    rotary = Rotary(d, inv_freq(d, 100000.0))
    gen = _gen(3)
    kv = [_prompt(700, h, d, rotary, gen) for _ in range(layers)]
    config = SparseConfig(budget_fraction=0.05, budget_min_tokens=16, rank_fraction=0.25,
                          rank_min=16, sink_tokens=4, local_tokens=16, outlier_min_chunks=2,
                          keys=keys).resolved("cuda")  # chunks of 8 lowrank, 4 exact
    plan = plan_for(config, 700, h, d)
    # Layer 1 scores KV head 2 from its exact keys: both paths must agree there too.
    states = [build_layer_state(k, v, plan, rotary, device=DEV, exact_heads=(2,) * layer)
              for layer, (k, v) in enumerate(kv)]
    local = [(k[plan.shared:], v[plan.shared:]) for k, v in kv]

    def requests(ops):
        ws = SparseWorkspace(layers, d, 4000, dtype=F32, device=DEV)
        return [SparseRequest(states, plan, ws, rotary, local, ops=ops) for _ in range(2)]

    torch_step = SparseStep(requests(TorchOps()), attend=paged_decode)
    triton_step = SparseStep(requests(TritonOps()), attend=paged_decode_triton)
    for step in range(2):
        for layer in range(layers):
            q = torch.randn(2, h * g, d, generator=gen).to(DEV)
            want = torch_step.run(layer, q, d ** -0.5)
            got = triton_step.run(layer, q, d ** -0.5)
            for a, b in zip(torch_step.requests, triton_step.requests):
                assert torch.equal(a.held[layer], b.held[layer]), (step, layer)
            torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    misses = [r.stats.missed_chunks for r in triton_step.requests]
    assert misses == [r.stats.missed_chunks for r in torch_step.requests] and min(misses) > 0
    fetched = [r.stats.gathered_bytes for r in triton_step.requests]
    assert fetched == [r.stats.gathered_bytes for r in torch_step.requests]


def test_step_ops_follow_the_kernel_setting_and_the_device():
    for kernel in ("auto", "torch", "triton", "flashinfer"):
        assert resolve_ops(kernel, "cpu").name == "torch"  # the interpreter is for tests
        assert resolve_ops(kernel, "cuda").name == ("torch" if kernel == "torch" else "triton")
