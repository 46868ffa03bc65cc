"""Exact-key scoring for the heads a landmark misses (``sparse.exact_score_heads``)."""

import pytest
import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.budget import plan_for
from sgl_kvtier.sparse.manager import SparseManager, exact_heads_by_layer
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.select import chunk_scores, exact_scores, select_chunks
from sgl_kvtier.sparse.state import build_layer_state
from sgl_kvtier.sparse.step_ops import TorchOps

H, G, D, T = 3, 3, 32, 1200
ROT = Rotary(D, inv_freq(D, 10000.0))
CONFIG = SparseConfig(enabled=True, min_context_tokens=256, budget_fraction=0.02,
                      budget_min_tokens=16, sink_tokens=4, local_tokens=16,
                      keys="exact", chunk_tokens=4, outlier_fraction=0.0,
                      outlier_min_chunks=0)  # the planted chunk is the outlier one would keep


def test_exact_scores_are_each_chunks_softmax_mass_max_over_the_group():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 9, 4, 8, generator=gen)  # [E, N, C, D]
    q = torch.randn(2, 3, 8, generator=gen)  # [E, G, D]
    able = torch.ones(2, 9, dtype=torch.bool)
    able[1, 4] = False
    got = exact_scores(q, keys, able, 0.7)
    for e in range(2):
        mass = []
        for g in range(3):  # each query head's softmax over the selectable tokens, per chunk
            logits = (keys[e].reshape(-1, 8) @ q[e, g]) * 0.7
            logits[~able[e].repeat_interleave(4)] = float("-inf")
            mass.append(logits.softmax(0).view(9, 4).sum(1))
        torch.testing.assert_close(got[e], torch.stack(mass).amax(0))
    assert got[1, 4] == 0  # an outlier chunk is attended anyway: it scores nothing


def test_bf16_keys_score_like_float32_and_return_float32():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 64, 4, 16, generator=gen)
    q = torch.randn(2, 3, 16, generator=gen)
    able = torch.ones(2, 64, dtype=torch.bool)
    want = exact_scores(q, keys, able, 0.25)
    got = exact_scores(q.to(torch.bfloat16), keys.to(torch.bfloat16), able, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.1)
    assert (select_chunks(got, 4) == select_chunks(want, 4)).float().mean() >= 0.75


def _copy_target(seed=1):
    """A prompt whose KV head 1 has one key along a query head's query inside a chunk whose
    other keys point away, so the chunk's mean key (its landmark) hides it."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(T, H, D, generator=gen)
    v = torch.randn(T, H, D, generator=gen)
    q = torch.randn(H * G, D, generator=gen)
    plan = plan_for(CONFIG, T, H, D)
    chunk = plan.chunks // 2
    first = plan.sink + chunk * plan.chunk
    u = q[G + 1] / q[G + 1].norm()  # query head 1 of KV head 1's group
    k[first, 1] = 6 * u
    k[first + 1:first + plan.chunk, 1] = -3 * u
    return k, v, q, plan, chunk


def test_an_exact_head_finds_the_key_its_landmark_hides():
    k, v, q, plan, chunk = _copy_target()
    plain = build_layer_state(k, v, plan, ROT)
    scale = D ** -0.5
    landmark = select_chunks(TorchOps().scores(q, plain, scale), plan.selected_chunks)
    assert chunk not in landmark[1].tolist()  # the landmark misses it (the precondition)
    exact = build_layer_state(k, v, plan, ROT, exact_heads=[1])
    scores = TorchOps().scores(q, exact, scale)
    assert chunk in select_chunks(scores, plan.selected_chunks)[1].tolist()
    # The other heads keep their landmark scores; the keys kept are the head's middle keys.
    torch.testing.assert_close(scores[[0, 2]], chunk_scores(q, plain.landmarks,
                                                            plain.selectable, scale)[[0, 2]])
    assert torch.equal(exact.exact_keys[0], exact.keys[1])
    assert exact.nbytes()["exact_keys"] == plan.middle * D * 4


def test_the_manager_scores_the_named_heads_exactly_and_counts_them():
    k, v, q, plan, chunk = _copy_target(2)
    config = CONFIG.model_copy(update={"exact_score_heads": [[1, 1]]})
    manager = SparseManager(config, ROT, 2, H, D, 4000, torch.float32, "cpu")
    kv = [(k.clone(), v.clone()), (k, v)]
    assert manager.convert("a", list(range(T)), lambda layer: kv[layer])
    step = manager.step(["a"])
    for layer in range(2):
        step.run(layer, q[None], D ** -0.5)
    held = manager.requests["a"].held
    assert chunk in held[1, 1].tolist() and chunk not in held[0, 1].tolist()
    assert manager.report()["exact_scored"] == 1  # one head, one layer, one step


def test_heads_outside_the_model_are_named():
    assert exact_heads_by_layer([[3, 1], [3, 0], [5, 2]], 6, 3) == {3: (0, 1), 5: (2,)}
    for pair in ([6, 0], [0, 3]):
        with pytest.raises(ValueError, match=r"sparse.exact_score_heads: \[.*6 layers, 3 KV"):
            exact_heads_by_layer([pair], 6, 3)
