"""Selecting for a whole batch at once leaves what stepping each request alone leaves."""

import pytest
import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.manager import SparseManager
from sgl_kvtier.sparse.ops import gather_values, rebuild_keys
from sgl_kvtier.sparse.rope import Rotary, inv_freq
from sgl_kvtier.sparse.select import select_chunks
from sgl_kvtier.sparse.step_ops import TorchOps

L, H, G, D = 2, 3, 3, 16
CONFIG = SparseConfig(min_context_tokens=256, budget_min_tokens=32, budget_fraction=0.01,
                      sink_tokens=4, local_tokens=16)
# Two prompt lengths with one budget (shorter score rows are padded in the stacked table)
# and a third with a larger budget (a group of its own).
CONTEXTS = (600, 1000, 600, 4000)


class CountingOps(TorchOps):
    """PyTorch ops that count the rebuild/fetch calls (one per request with misses)."""

    def __init__(self):
        self.writes = 0

    def write_chunks(self, *args, **kwargs):
        self.writes += 1
        return super().write_chunks(*args, **kwargs)


def _manager(ops, keys):
    config = CONFIG.model_copy(update={"keys": keys})
    manager = SparseManager(config, Rotary(D, inv_freq(D, 10000.0)), L, H, D, 20000,
                            torch.float32, "cpu", ops=ops)
    gen = torch.Generator().manual_seed(7)
    for i, t in enumerate(CONTEXTS):
        kv = [(torch.randn(t, H, D, generator=gen), torch.randn(t, H, D, generator=gen))
              for _ in range(L)]
        tokens = list(range(10_000 * i, 10_000 * i + t))  # no two share a state
        assert manager.convert(f"r{i}", tokens, lambda layer, kv=kv: kv[layer])
    return manager


@pytest.mark.parametrize("keys", ["lowrank", "exact"])
def test_a_batched_step_equals_stepping_each_request_alone(keys):
    batched_ops, alone_ops = CountingOps(), CountingOps()
    batched, alone = _manager(batched_ops, keys), _manager(alone_ops, keys)
    rids = [f"r{i}" for i in range(len(CONTEXTS))]
    plans = [batched.requests[r].plan for r in rids]
    assert plans[0].selected_chunks == plans[1].selected_chunks  # one group ...
    assert plans[0].chunks != plans[1].chunks  # ... with padded rows
    assert plans[3].selected_chunks != plans[0].selected_chunks  # and a second group
    step = batched.step(rids)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(len(rids), H * G, D, generator=gen)
    for _ in range(6):
        q = q + 0.3 * torch.randn(q.shape, generator=gen)  # drift: some chunks change
        for layer in range(L):
            step.run(layer, q, D ** -0.5)
            for b, rid in enumerate(rids):
                alone.requests[rid].step(layer, q[b], D ** -0.5)
                _holds_its_selection(batched, rid, layer, q[b])
    for rid in rids:
        a, b = batched.requests[rid], alone.requests[rid]
        assert torch.equal(a.held, b.held)
        for field in ("selected_chunks", "missed_chunks", "gathered_bytes"):
            assert getattr(a.stats, field) == getattr(b.stats, field), field
    assert torch.equal(batched.workspace.k, alone.workspace.k)
    assert torch.equal(batched.workspace.v, alone.workspace.v)
    missed = [batched.requests[r].stats.missed_chunks for r in rids]
    selected = [batched.requests[r].stats.selected_chunks for r in rids]
    assert all(0 < m < s for m, s in zip(missed, selected))  # held chunks were reused
    # One rebuild/fetch per request with misses, whichever way it was stepped.
    assert batched_ops.writes == alone_ops.writes > 0


def _holds_its_selection(manager, rid, layer, q):
    """The reference, independent of how the step got there: the request holds the top
    chunks of its own scores, each slot holding its chunk's keys (rebuilt, or fetched when
    exact) and values."""
    r = manager.requests[rid]
    state, plan, ws = r.layers[layer], r.plan, manager.workspace
    want = select_chunks(TorchOps().scores(q, state, D ** -0.5), plan.selected_chunks)
    held = r.held[layer]
    assert torch.equal(held.sort(dim=1).values, want)
    heads = torch.arange(H).repeat_interleave(plan.selected_chunks)
    chunks, where = held.flatten(), torch.arange(plan.selected_chunks).repeat(H)
    first = r.starts[heads] + plan.dense + where * plan.chunk
    slots = (first[:, None] + torch.arange(plan.chunk)).flatten()
    keys = (rebuild_keys(state.u, state.sv, heads, chunks, plan.chunk, state.start, r.rotary)
            if state.keys is None else gather_values(state.keys, heads, chunks))
    assert torch.allclose(ws.k[layer, slots], keys.flatten(0, 1), atol=1e-5)
    values = gather_values(state.values, heads, chunks)
    assert torch.equal(ws.v[layer, slots], values.flatten(0, 1))
