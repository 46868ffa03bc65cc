"""The CPU dense path of the kvtier backend agrees with an explicit-softmax reference and,
for prompts without a cached prefix, is bit-identical to torch_native's call. Attention
states of parts of the keys merge into the attention over all of them, and decode over a
request's slots in several runs of the pool is at least as exact in bfloat16 as
torch_native's one SDPA over the gathered KV."""

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sgl_kvtier.attention.dense import (
    decode_attention,
    decode_attention_runs,
    extend_attention,
    extend_attention_ref,
)
from sgl_kvtier.attention.merge import (
    causal_partial_attention,
    merge_attention_states,
    partial_attention,
    partial_attention_ref,
)


def qkv(n_new, prefix, h_q=9, h_kv=3, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_new, h_q, d, generator=g).to(dtype)
    k = torch.randn(prefix + n_new, h_kv, d, generator=g).to(dtype)
    v = torch.randn(prefix + n_new, h_kv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("n_new,prefix", [(1, 0), (7, 0), (1, 100), (16, 33), (64, 512)])
@pytest.mark.parametrize("h_q,h_kv", [(9, 3), (4, 4), (8, 1)])
def test_extend_matches_reference(n_new, prefix, h_q, h_kv):
    q, k, v = qkv(n_new, prefix, h_q, h_kv)
    out = extend_attention(q, k, v, prefix)
    torch.testing.assert_close(out, extend_attention_ref(q, k, v, prefix), atol=2e-5, rtol=1e-4)


def test_extend_bf16_close_to_reference():
    q, k, v = qkv(32, 200, dtype=torch.bfloat16)
    out = extend_attention(q, k, v, 200, scale=0.1)
    torch.testing.assert_close(out, extend_attention_ref(q, k, v, 200, scale=0.1),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_state_of_the_cpu_flash_op_matches_its_explicit_reference(dtype, monkeypatch):
    from sgl_kvtier.attention import merge

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(4, 40, 64, generator=g).to(dtype) for _ in range(3))
    out, lse = causal_partial_attention(q, k, v, 0.125)
    monkeypatch.setattr(merge, "_cpu_flash_op", lambda: None)
    ref_out, ref_lse = causal_partial_attention(q, k, v, 0.125)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_extend_without_the_cpu_flash_op_still_matches_reference(monkeypatch):
    from sgl_kvtier.attention import merge

    monkeypatch.setattr(merge, "_cpu_flash_op", lambda: None)
    q, k, v = qkv(24, 100)
    torch.testing.assert_close(extend_attention(q, k, v, 100), extend_attention_ref(q, k, v, 100),
                               atol=2e-5, rtol=1e-4)


def test_last_query_row_sees_whole_sequence_first_sees_prefix_plus_itself():
    # Changing a key after position prefix+i must not change query i's output.
    q, k, v = qkv(4, 10)
    base = extend_attention(q, k, v, 10)
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 5.0
    v2[-1] += 5.0
    changed = extend_attention(q, k2, v2, 10)
    torch.testing.assert_close(changed[:3], base[:3])
    assert not torch.allclose(changed[3], base[3])


def test_no_prefix_is_bit_identical_to_torch_native_call():
    q, k, v = qkv(50, 0, dtype=torch.bfloat16)
    native = sdpa(q.movedim(0, 1)[None], k.movedim(0, 1)[None], v.movedim(0, 1)[None],
                  is_causal=True, enable_gqa=True)[0].movedim(1, 0)
    assert torch.equal(extend_attention(q, k, v, 0), native)


def test_decode_equals_extend_of_one_token():
    q, k, v = qkv(1, 300)
    torch.testing.assert_close(decode_attention(q, k, v), extend_attention_ref(q, k, v, 300),
                               atol=2e-5, rtol=1e-4)


def test_contiguous_runs():
    from sgl_kvtier.attention.dense import contiguous_runs

    slots = torch.tensor([5, 6, 7, 20, 21, 3])
    assert contiguous_runs(slots) == [(5, 8), (20, 22), (3, 4)]
    assert contiguous_runs(torch.arange(10, 4106)) == [(10, 4106)]
    assert contiguous_runs(torch.tensor([1, 3, 5, 7]), max_runs=3) is None
    assert contiguous_runs(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize("cuts", [[], [100], [7, 250, 251]])
def test_decode_on_pool_views_matches_gathered_decode(cuts):
    from sgl_kvtier.attention.dense import contiguous_runs, decode_attention_runs

    g = torch.Generator().manual_seed(1)
    k_pool, v_pool = torch.randn(2000, 3, 64, generator=g), torch.randn(2000, 3, 64, generator=g)
    q = torch.randn(1, 9, 64, generator=g)
    # A request whose 300 slots sit in several places of the pool, out of order.
    bounds = [0, *cuts, 300]
    starts = [1500, 40, 900, 1200][: len(bounds) - 1]
    slots = torch.cat([torch.arange(s, s + (b - a)) for s, a, b in zip(starts, bounds, bounds[1:])])
    runs = contiguous_runs(slots)
    assert len(runs) == len(bounds) - 1
    out = decode_attention_runs(q, k_pool, v_pool, runs, scale=0.125)
    ref = decode_attention(q, k_pool[slots], v_pool[slots], scale=0.125)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    if not cuts:  # one run takes the same SDPA call as the gathered path
        assert torch.equal(out, ref)


def split_state(q, k, v, cuts, attend):
    """Attention states of ``q`` (H, Lq, D) over the parts of k, v (H, L, D) cut at ``cuts``."""
    bounds = [0, *cuts, k.shape[1]]
    return zip(*[attend(q, k[:, a:b], v[:, a:b], 0.125) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("attend", [partial_attention, partial_attention_ref],
                         ids=["cpu_flash", "ref"])
@pytest.mark.parametrize("cuts", [[1], [5, 6, 400], [100, 700, 701, 1500]])
@pytest.mark.parametrize("dv", [64, 48])
def test_merged_states_equal_attention_over_the_concatenation(attend, cuts, dv):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 64, generator=g) * 2, torch.randn(3, 2000, 64, generator=g),
               torch.randn(3, 2000, dv, generator=g))
    out, lse = merge_attention_states(*split_state(q, k, v, cuts, attend))
    scores = q.double() @ k.double().transpose(1, 2) * 0.125
    expected = scores.softmax(-1) @ v.double()
    assert out.dtype == torch.float32 and out.shape == (3, 4, dv)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-6)


def test_a_part_seen_by_no_query_contributes_nothing():
    g = torch.Generator().manual_seed(3)
    out, lse = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, generator=g)
    empty_out = torch.full_like(out, float("nan"))  # 0/0 of a fully masked part
    empty_lse = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention_states([empty_out, out], [empty_lse, lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    nothing, nothing_lse = merge_attention_states([empty_out], [empty_lse])
    assert torch.equal(nothing, torch.zeros_like(out)) and torch.isneginf(nothing_lse).all()


def test_cpu_flash_state_matches_reference_on_bf16_pool_views():
    g = torch.Generator().manual_seed(4)
    pool = torch.randn(600, 3, 64, generator=g).bfloat16()
    q = torch.randn(3, 3, 64, generator=g).bfloat16()
    view = pool[100:400].transpose(0, 1)  # strided, as decode reads it
    out, lse = partial_attention(q, view, view, 0.125)
    ref_out, ref_lse = partial_attention_ref(q, view, view, 0.125)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_decode_runs_without_the_cpu_flash_op_uses_the_float32_reference(monkeypatch):
    from sgl_kvtier.attention import merge

    monkeypatch.setattr(merge, "_cpu_flash_op", lambda: None)
    q, k_pool, v_pool, runs, slots = scattered_request(torch.float32, [7, 250], 300, seed=5)
    out = decode_attention_runs(q, k_pool, v_pool, runs, scale=0.125)
    ref = decode_attention(q, k_pool[slots], v_pool[slots], scale=0.125)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def scattered_request(dtype, cuts, length, seed, q_scale=1.0):
    """A request's ``length`` KV slots cut into runs at ``cuts``, placed in the pool in
    reverse order with gaps; SmolLM2-135M's heads (9 query, 3 KV, head_dim 64)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0, *cuts, length]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    starts, at = [], 17
    for size in reversed(sizes):
        starts.insert(0, at)
        at += size + 31
    k_pool, v_pool = (torch.randn(at, 3, 64, generator=g).to(dtype) for _ in range(2))
    q = (torch.randn(1, 9, 64, generator=g) * q_scale).to(dtype)
    runs = [(s, s + n) for s, n in zip(starts, sizes)]
    slots = torch.cat([torch.arange(a, b) for a, b in runs])
    return q, k_pool, v_pool, runs, slots


@pytest.mark.parametrize("seed", range(4))
def test_bf16_multi_run_decode_is_as_exact_as_torch_natives_one_sdpa(seed):
    """Regression (issue 9): bf16 scores rounded per run and outputs summed in bf16 made
    kvtier's decode 4-8x less exact than torch_native's here, and greedy continuations split.

    Both outputs are bf16, so both pay the rounding of the exact result; torch_native also
    rounds its probabilities to bf16 inside SDPA, the merge of float32 states does not. So
    the merged output is at least as exact, up to how a different CPU's kernels round: bound
    1.1x. Measured 0.80-0.87x, which is the rounding of the exact result itself; the old
    path 4.3-8.2x.
    """
    g = torch.Generator().manual_seed(100 + seed)
    n_runs = 3 + seed % 3
    cuts = sorted(torch.randperm(4095, generator=g)[:n_runs - 1].add(1).tolist())
    q, k_pool, v_pool, runs, slots = scattered_request(torch.bfloat16, cuts, 4096, seed,
                                                       q_scale=2.0)
    assert len(runs) == n_runs
    k, v = k_pool[slots], v_pool[slots]
    # torch_native's decode: gather, then one SDPA over heads [1, H, L, D].
    native = sdpa(q.movedim(0, 1)[None], k.movedim(0, 1)[None], v.movedim(0, 1)[None],
                  enable_gqa=True, scale=0.125)[0].movedim(1, 0)
    exact = extend_attention_ref(q.double(), k.double(), v.double(), 4095, scale=0.125)
    error = lambda out: ((out.double() - exact).norm() / exact.norm()).item()
    ours = decode_attention_runs(q, k_pool, v_pool, runs, scale=0.125)
    assert ours.dtype == torch.bfloat16
    assert error(ours) <= 1.1 * error(native), (error(ours), error(native))
