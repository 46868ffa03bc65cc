"""The CPU dense path of the kvtier backend agrees with an explicit-softmax reference and,
for prompts without a cached prefix, is bit-identical to torch_native's call."""

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sgl_kvtier.attention.dense import decode_attention, extend_attention, extend_attention_ref


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
