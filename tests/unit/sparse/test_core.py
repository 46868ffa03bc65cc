"""The sparse decode core against dense attention, in plain PyTorch on CPU."""

import math

import pytest
import torch

from sgl_kvtier.attention.dense import decode_attention
from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.batch_select import assign_slots
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.decode import SparseStep, merge_tail
from sgl_kvtier.sparse.paged import (
    PageTable,
    TorchPagedDecode,
    contiguous_runs,
    paged_decode,
    paged_decode_ref,
    region_table,
)
from sgl_kvtier.sparse.request import SparseRequest
from sgl_kvtier.sparse.rope import Rotary, inv_freq, rotary_from_config
from sgl_kvtier.sparse.select import bound_scores, chunk_scores, select_chunks
from sgl_kvtier.sparse.state import build_layer_state, low_rank_keys
from sgl_kvtier.sparse.workspace import SparseWorkspace, WorkspaceFull

H, G, D = 3, 3, 64
ROT = Rotary(D, inv_freq(D, 100000.0))


def _prompt(t, layers=2, seed=0):
    """Post-RoPE keys with structure (a few directions per head) and random values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        basis = torch.randn(8, H * D, generator=gen)
        k_pre = (torch.randn(t, 8, generator=gen) @ basis).view(t, H, D)
        k_pre += 0.05 * torch.randn(t, H, D, generator=gen)
        k = ROT.apply(k_pre, torch.arange(t))
        out.append((k, torch.randn(t, H, D, generator=gen)))
    return out


def _sparse(kv, config, ws_slots=20000):
    config = config.resolved("cuda")  # ShadowKV's low-rank keys unless a test says exact
    plan = plan_for(config, kv[0][0].shape[0], H, D)
    states = [build_layer_state(k, v, plan, ROT) for k, v in kv]
    ws = SparseWorkspace(len(kv), D, ws_slots, dtype=torch.float32)
    local = [(k[plan.shared:], v[plan.shared:]) for k, v in kv]
    return plan, SparseRequest(states, plan, ws, ROT, local)


def test_rope_inverts_exactly_and_matches_rotate_half():
    x = torch.randn(50, H, D, dtype=torch.float64).float()
    pos = torch.arange(1000, 1050)
    assert torch.allclose(ROT.invert(ROT.apply(x, pos), pos), x, atol=1e-5)
    # Independent formula: x*cos + rotate_half(x)*sin with the full-width angle table.
    angle = pos[:, None].double() * ROT.inv_freq
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
    half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    assert torch.allclose(ROT.apply(x, pos), (x * cos + half * sin).float(), atol=1e-5)


def test_cached_angle_table_gives_the_directly_computed_values():
    rot = rotary_from_config({"rope_theta": 10_000.0, "head_dim": D})
    for pos in (torch.tensor([0, 7, 3]), torch.tensor([9_000, 1, 12_345])):  # the second grows it
        cos, sin = rot.cos_sin(pos)
        angle = pos[:, None].double() * rot.inv_freq
        assert torch.equal(cos, angle.cos().float()) and torch.equal(sin, angle.sin().float())
    assert rot._table[0].shape[0] >= 12_346


def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                         rope_parameters=scaling, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rotary_from_config({"head_dim": 128, "rope_theta": 500000.0, "rope_scaling": scaling})
    assert torch.allclose(ours.inv_freq.float(), theirs.float(), rtol=1e-5)
    assert not torch.allclose(ours.inv_freq, inv_freq(128, 500000.0))  # scaling took effect


def test_unsupported_rope_scaling_is_named():
    with pytest.raises(ValueError, match="'yarn'"):
        rotary_from_config({"head_dim": 64, "rope_scaling": {"rope_type": "yarn"}})


def test_low_rank_factors_reconstruct_at_full_rank_and_truncate_by_energy():
    k = torch.randn(200, H, D)
    u, sv = low_rank_keys(k, H * D)
    assert torch.allclose(torch.einsum("tr,hrd->thd", u, sv), k, atol=1e-4)
    u8, sv8 = low_rank_keys(k, 8)
    assert u8.shape == (200, 8) and sv8.shape == (H, 8, D)


def test_plan_is_relative_with_floors_and_caps():
    config = SparseConfig(budget_fraction=0.03, budget_min_tokens=64, budget_max_tokens=2048,
                          rank_fraction=0.25, rank_min=16, sink_tokens=16,
                          local_tokens=64).resolved("cuda")
    small = plan_for(config, 4096, 3, 64)
    assert small.rank == 48 and small.selected == math.ceil(0.03 * 4096 / 8) * 8
    assert small.sink + small.middle + small.local == 4096 and 64 <= small.local < 64 + 128
    assert plan_for(config, 4100, 3, 64).shared == small.shared  # a longer question: shared
    big = plan_for(config, 131072, 8, 128)
    assert big.rank == 256 and big.selected == 2048  # capped
    tiny = plan_for(config, 600, 3, 64)
    assert tiny.selected == 64  # the floor
    assert not small.exact_keys
    exact = plan_for(config.model_copy(update={"keys": "exact"}), 4096, 3, 64)
    assert exact.exact_keys and exact.rank == 0


def test_workspace_allocator_reuses_and_coalesces():
    ws = SparseWorkspace(1, 4, 100)
    a, b, c = ws.allocate(30), ws.allocate(30), ws.allocate(30)
    with pytest.raises(WorkspaceFull):
        ws.allocate(20)
    ws.release(a)
    ws.release(b)
    assert ws.allocate(60) == 0 and ws.used_slots == 90
    ws.release(c)


def test_assign_slots_keeps_held_chunks_in_place():
    held = torch.tensor([[5, 9, 2, -1], [1, 2, 3, 4]])
    new = torch.tensor([[2, 5, 7, 11], [1, 2, 3, 4]])
    slot, miss = assign_slots(held, new)
    assert slot[0, 0] == 2 and slot[0, 1] == 0 and miss[0].tolist() == [False, False, True, True]
    assert sorted(slot[0].tolist()) == [0, 1, 2, 3] and set(slot[0, 2:].tolist()) == {1, 3}
    assert not miss[1].any() and slot[1].tolist() == [0, 1, 2, 3]
    for seed in range(20):  # random: always a permutation, hits never move
        gen = torch.Generator().manual_seed(seed)
        held = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in range(4)])
        new = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in range(4)])
        slot, miss = assign_slots(held, new)
        assert (slot.sort(1).values == torch.arange(10)).all()
        assert (held.gather(1, slot)[~miss] == new[~miss]).all()


def test_selection_takes_the_max_over_the_query_group():
    landmarks = torch.zeros(1, 6, 4)
    landmarks[0, 4, 0] = landmarks[0, 1, 1] = 1.0
    q = torch.zeros(2, 4)
    q[0, 0], q[1, 1] = 20.0, 5.0  # head 0 wants chunk 4 strongly, head 1 chunk 1 mildly
    scores = chunk_scores(q, landmarks, torch.ones(1, 6, dtype=torch.bool), 1.0)
    assert select_chunks(scores, 2).tolist() == [[1, 4]]
    blocked = torch.ones(1, 6, dtype=torch.bool)
    blocked[0, 4] = False
    assert 4 not in select_chunks(chunk_scores(q, landmarks, blocked, 1.0), 2).tolist()[0]


def test_table_over_the_workspace_matches_dense_attention_over_the_same_selection():
    ws = SparseWorkspace(1, D, 400, dtype=torch.float32)
    ws.k.normal_()
    ws.v.normal_()
    starts, lengths = torch.tensor([0, 70, 140, 250]), torch.tensor([70, 33, 100, 1])
    q = torch.randn(4, G, D)
    for page in (1, 2):
        if page == 2:
            lengths = torch.tensor([70, 34, 100, 2])
        table = region_table(starts, lengths, page)
        out, lse = paged_decode(q, ws.k[0], ws.v[0], table, D ** -0.5)
        ref, ref_lse = paged_decode_ref(q, ws.k[0], ws.v[0], table, D ** -0.5)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
        for row, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            dense = torch.softmax(q[row] @ ws.k[0, a:a + n].T * D ** -0.5, -1) @ ws.v[0, a:a + n]
            assert torch.allclose(out[row], dense, atol=1e-5)


def test_contiguous_rows_are_read_in_place_and_agree_with_the_reference():
    ws = SparseWorkspace(2, D, 900, dtype=torch.float32)
    ws.k.normal_()
    ws.v.normal_()
    # Two requests of 3 rows (KV heads) with 50-slot regions, not adjacent; a third of 3
    # rows of 20; the layer-1 view has a storage offset the blocks must honour.
    starts = torch.tensor([0, 50, 100, 400, 450, 500, 700, 720, 740])
    lengths = torch.tensor([50] * 6 + [20] * 3)
    q = torch.randn(9, G, D)
    for page in (1, 2, 5):
        table = region_table(starts, lengths, page)
        runs = contiguous_runs(table)
        assert runs == [(0, 3, 0, 50, 50), (3, 3, 400, 50, 50), (6, 3, 700, 20, 20)]
        decode = TorchPagedDecode()
        out, lse = decode(q, ws.k[1], ws.v[1], table, D ** -0.5)
        ref, ref_lse = paged_decode_ref(q, ws.k[1], ws.v[1], table, D ** -0.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        assert decode._runs == runs and decode._plan is None  # read in place, not gathered
    # Pages out of order: not contiguous, so the decode gathers (and still agrees).
    table = PageTable(torch.tensor([0, 2, 3], dtype=torch.int32),
                      torch.tensor([5, 3, 9], dtype=torch.int32),
                      torch.tensor([4, 2], dtype=torch.int32), 4)
    assert contiguous_runs(table) is None
    decode = TorchPagedDecode()
    out, lse = decode(q[:2], ws.k[0], ws.v[0], table, D ** -0.5)
    assert decode._runs is None and decode._plan is not None
    ref, ref_lse = paged_decode_ref(q[:2], ws.k[0], ws.v[0], table, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_full_budget_full_rank_is_dense_attention():
    kv = _prompt(1000)
    config = SparseConfig(budget_fraction=1.0, budget_max_tokens=100000, rank_fraction=1.0,
                          sink_tokens=4, local_tokens=20, outlier_min_chunks=3)
    plan, request = _sparse(kv, config)
    assert plan.selected_chunks + plan.outlier_chunks == plan.chunks
    assert plan.local >= 20 and plan.shared + plan.local == 1000
    step = SparseStep([request])
    gen = torch.Generator().manual_seed(1)
    for layer in range(2):
        q = torch.randn(1, H * G, D, generator=gen)
        new_k, new_v = torch.randn(3, H, D, generator=gen), torch.randn(3, H, D, generator=gen)
        out, lse = step.run(layer, q, D ** -0.5)
        got = merge_tail(q[0], (out[0], lse[0]), new_k, new_v, D ** -0.5)
        k, v = torch.cat([kv[layer][0], new_k]), torch.cat([kv[layer][1], new_v])
        want = decode_attention(q, k, v, D ** -0.5)[0]
        assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()


def test_exact_keys_make_a_full_budget_dense_at_any_rank_setting():
    kv = _prompt(1000)
    config = SparseConfig(budget_fraction=1.0, budget_max_tokens=100000, rank_fraction=0.01,
                          rank_min=2, sink_tokens=4, local_tokens=20, outlier_min_chunks=3)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, H * G, D, generator=gen)
    new_k, new_v = torch.randn(3, H, D, generator=gen), torch.randn(3, H, D, generator=gen)
    want = decode_attention(q, torch.cat([kv[0][0], new_k]), torch.cat([kv[0][1], new_v]),
                            D ** -0.5)[0]
    errors = {}
    for keys in ("lowrank", "exact"):
        plan, request = _sparse(kv, config.model_copy(update={"keys": keys}))
        out, lse = SparseStep([request]).run(0, q, D ** -0.5)
        got = merge_tail(q[0], (out[0], lse[0]), new_k, new_v, D ** -0.5)
        errors[keys] = (got - want).abs().max().item()
        state = request.layers[0]
        if keys == "exact":
            # No factors on the device; the exact keys beside the values, same bytes.
            assert plan.rank == 0 and state.u.numel() == state.sv.numel() == 0
            middle = kv[0][0][plan.sink:plan.shared].view(plan.chunks, plan.chunk, H, D)
            assert torch.equal(state.keys, middle.permute(2, 0, 1, 3))
            assert state.host_bytes() == 2 * state.nbytes()["values"]
            fetched = plan.selected_chunks * H * plan.chunk * D * 4  # every chunk a miss
            assert request.stats.gathered_bytes == 2 * fetched  # keys and values
    # Rank 2 of 192 is far from the keys; exact keys do not depend on it.
    assert errors["lowrank"] > 1e-2 and errors["exact"] < 2e-4, errors


def test_small_budget_finds_a_planted_needle_and_reuses_held_chunks():
    kv = _prompt(2000, layers=1)
    k, v = kv[0]
    needle = 1000
    q = torch.randn(H * G, D)
    # Keys and queries are both post-RoPE: a key along head 1's queries scores high there.
    k[needle, 1] = 50 * q[G:2 * G].mean(0)
    config = SparseConfig(budget_fraction=0.02, budget_min_tokens=16, rank_fraction=1.0,
                          sink_tokens=4, local_tokens=16, outlier_fraction=0.0,
                          outlier_min_chunks=0)
    plan, request = _sparse([(k, v)], config)
    step = SparseStep([request])
    step.run(0, q[None], D ** -0.5)
    chunk = (needle - plan.sink) // plan.chunk
    assert chunk in request.held[0, 1].tolist()
    missed = request.stats.missed_chunks
    step.run(0, q[None], D ** -0.5)
    assert request.stats.missed_chunks == missed  # same query: every chunk was a hit
    assert request.stats.hit_rate == 0.5


def test_bound_scores_bound_every_key_and_catch_what_the_mean_hides():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 7, 8, 16, generator=gen)  # [H, N, C, D]
    q = torch.randn(6, 16, generator=gen)  # 3 query heads per KV head
    low, high = keys.amin(2), keys.amax(2)  # [H, N, D]
    qg = q.view(2, 3, 1, 16)
    corner = torch.maximum(qg * low[:, None], qg * high[:, None]).sum(-1)  # [H, G, N]
    true_max = (qg[:, :, :, None] * keys[:, None]).sum(-1).amax(-1)
    assert (corner >= true_max - 1e-4).all()  # no key in the chunk scores above its bound
    got = bound_scores(q, torch.stack([low, high]), torch.ones(2, 7, dtype=torch.bool), 0.5)
    torch.testing.assert_close(got, (corner * 0.5).softmax(-1).amax(1))
    # One key along the query among seven against it: the mean points away, the box not.
    q1 = torch.zeros(1, 4)
    q1[0, 0] = 1.0
    chunks = torch.zeros(1, 3, 8, 4)
    chunks[0, 1, 0, 0], chunks[0, 1, 1:, 0] = 8.0, -2.0
    chunks[0, 2, :, 0] = 0.5  # a uniformly mild chunk
    ok = torch.ones(1, 3, dtype=torch.bool)
    assert select_chunks(chunk_scores(q1, chunks.mean(2), ok, 1.0), 1).item() == 2
    box = torch.stack([chunks.amin(2), chunks.amax(2)])
    assert select_chunks(bound_scores(q1, box, ok, 1.0), 1).item() == 1
