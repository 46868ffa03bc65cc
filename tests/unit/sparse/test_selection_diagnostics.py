"""The measures of eval/sparse_selection_recall.py, the masking of
eval/sparse_selection_decode.py and the copy-head calibration of eval/retrieval_heads.py, on
synthetic attention (no model)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.budget import plan_for

EVAL = Path(__file__).resolve().parents[3] / "eval"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


recall = _script("sparse_selection_recall")
decode = _script("sparse_selection_decode")
heads = _script("retrieval_heads")
H, G, D, T = 2, 3, 16, 600
PLAN = plan_for(SparseConfig(enabled=True, budget_fraction=0.06, budget_min_tokens=32,
                             keys="lowrank", chunk_tokens=8), T, H, D)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(H * G, 4, D, generator=gen), torch.randn(H, T + 4, D, generator=gen)


def test_dense_probs_are_each_steps_causal_softmax():
    q, keys = _data()
    steps = torch.arange(T, T + 4)
    probs = recall.dense_probs(q, keys, steps, 0.25)
    for i, p in enumerate(steps.tolist()):
        for head in range(H * G):
            want = (q[head, i] @ keys[head // G, :p + 1].T * 0.25).softmax(-1)
            torch.testing.assert_close(probs[head, i, :p + 1], want)
            assert probs[head, i, p + 1:].sum() == 0


def test_kept_is_one_for_every_chunk_and_the_middle_share_for_none():
    q, keys = _data(1)
    probs = recall.dense_probs(q, keys, torch.arange(T, T + 4), 0.25)[:, 0]
    middle = probs[:, PLAN.sink:PLAN.shared].sum(1)
    kept, lost = recall._kept(probs, torch.ones(H, PLAN.chunks, dtype=torch.bool), PLAN)
    torch.testing.assert_close(kept, torch.ones(H * G))
    torch.testing.assert_close(lost, torch.zeros(H * G), atol=1e-6, rtol=0)
    kept, lost = recall._kept(probs, torch.zeros(H, PLAN.chunks, dtype=torch.bool), PLAN)
    torch.testing.assert_close(kept, torch.zeros(H * G))
    torch.testing.assert_close(lost, middle)


def test_needle_counts_only_the_chosen_chunks_of_the_needle():
    q, keys = _data(2)
    probs = recall.dense_probs(q, keys, torch.arange(T, T + 4), 0.25)[:, 0]
    needle = torch.arange(PLAN.sink + 3 * PLAN.chunk, PLAN.sink + 5 * PLAN.chunk)  # chunks 3-4
    chosen = torch.zeros(H, PLAN.chunks, dtype=torch.bool)
    chosen[0, 3] = True  # KV head 0 holds half the needle, head 1 none of it
    kept, seen = recall._needle(probs, chosen, PLAN, needle)
    assert seen == pytest.approx(float(probs[:, needle].sum()), rel=1e-5)
    assert kept == pytest.approx(float(probs[:G, needle[:PLAN.chunk]].sum()), rel=1e-5)


def test_mass_scores_pick_the_chunk_holding_the_attended_key():
    q, keys = _data(3)
    mid = keys[:, PLAN.sink:PLAN.shared].clone()
    mid[1, 7 * PLAN.chunk + 2] = 40 * q[G, 0] / q[G, 0].norm()  # query head G reads KV head 1
    scores = recall._mass_scores(q, mid, PLAN, 0.25)[:, 0]  # (H, N)
    assert int(scores[1].argmax()) == 7
    assert scores[1, 7] > 0.99


def test_decode_masks_all_but_the_chosen_middle_chunks():
    q, keys = _data(4)
    k = keys[:, :T + 1]
    state = type("State", (), {"selectable": torch.ones(H, PLAN.chunks, dtype=torch.bool)})()
    decode._SEL.plan, decode._SEL.rule = PLAN, "oracle"
    keep = decode._keep(q[:, 0], k, state, 0.25)
    middle = keep[:, PLAN.sink:PLAN.shared].view(H, PLAN.chunks, PLAN.chunk)
    assert keep[:, :PLAN.sink].all() and keep[:, PLAN.shared:].all()
    assert (middle.all(-1) == middle.any(-1)).all()  # whole chunks
    assert (middle.all(-1).sum(1) == PLAN.selected_chunks).all()


def test_rebuilt_middle_is_every_chunk_rebuilt_at_its_position():
    from sgl_kvtier.eval.offline_model import rebuilt_middle
    from sgl_kvtier.sparse.rope import Rotary, inv_freq
    from sgl_kvtier.sparse.state import build_layer_state

    rot = Rotary(D, inv_freq(D, 10000.0))
    _, keys = _data(5)
    k = keys.transpose(0, 1)[:T].contiguous()  # (T, H, D)
    state = build_layer_state(k, torch.randn_like(k), PLAN, rot)
    pre = torch.einsum("mr,hrd->mhd", state.u.float(), state.sv.float())
    want = rot.apply(pre, torch.arange(PLAN.sink, PLAN.shared)).transpose(0, 1)
    torch.testing.assert_close(rebuilt_middle(state, PLAN, rot), want)


def test_calibration_names_the_head_whose_landmark_hides_the_needle():
    from sgl_kvtier.sparse.rope import Rotary, inv_freq

    rot = Rotary(D, inv_freq(D, 10000.0))
    config = SparseConfig(enabled=True, budget_fraction=0.06, budget_min_tokens=32,
                          outlier_min_chunks=0, outlier_fraction=0.0).resolved("cpu")
    plan = plan_for(config, T, H, D)
    gen = torch.Generator().manual_seed(6)
    answer, total = 3, T + 1 + 3  # prompt, one forced question token, the answer
    q = [torch.randn(H * G, total, D, generator=gen) for _ in range(2)]
    k = [torch.randn(H, total, D, generator=gen) for _ in range(2)]
    v = [torch.randn(H, total, D, generator=gen) for _ in range(2)]
    first = plan.sink + 40 * plan.chunk  # the needle: the first token of chunk 40
    u = torch.randn(D, generator=gen)
    u /= u.norm()
    k[1][1, first] = 12 * u  # layer 1, KV head 1: one key the answer steps read ...
    k[1][1, first + 1:first + plan.chunk] = -6 * u  # ... in a chunk whose mean points away
    q[1][G + 2, T:] = 12 * u  # query head 2 of KV head 1's group, at the answer steps
    run = recall.ForcedRun(q, k, v, T, 1, answer, torch.tensor([first]))
    found = heads.sample_misses(run, config, rot, 0.5)
    assert set(found) == {(1, 1)}, found
    assert found[1, 1]["query_head"] == G + 2 and found[1, 1]["mass"] > 0.9
    assert found[1, 1]["kept"] == 0
    assert heads.heads_yaml([(1, 1), (7, 2)]) == "sparse:\n  exact_score_heads: [[1, 1], [7, 2]]\n"
