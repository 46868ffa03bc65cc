"""SparseManager: shared prompt states, workspace accounting, refusals."""

import weakref

import torch

from sgl_kvtier.attention.merge import partial_attention_ref
from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.manager import SparseManager
from sgl_kvtier.sparse.rope import Rotary, inv_freq

L, H, D = 2, 3, 16
CONFIG = SparseConfig(min_context_tokens=256, budget_min_tokens=32, sink_tokens=4,
                      local_tokens=16)


def _manager(slots=4000):
    return SparseManager(CONFIG, Rotary(D, inv_freq(D, 10000.0)), L, H, D, slots,
                         torch.float32, "cpu")


def _reader(tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(len(tokens), H, D, generator=gen),
           torch.randn(len(tokens), H, D, generator=gen)) for _ in range(L)]
    return lambda layer: kv[layer]


def test_requests_with_one_document_share_its_state_and_release_their_regions():
    manager = _manager()
    doc = list(range(1000, 1600))
    a, b = doc + [1, 2, 3], doc + [7, 8, 9, 10, 11]  # different questions
    assert manager.wants(len(a)) and not manager.wants(255)
    assert manager.convert("a", a, _reader(a, 0))
    assert manager.convert("b", b, _reader(b, 1))
    report = manager.report()
    assert report["shared_state_hits"] == 1 and report["states"] == 1 and report["active"] == 2
    assert manager.requests["a"].layers is manager.requests["b"].layers
    regions = manager.requests["a"].region + manager.requests["b"].region
    assert manager.workspace.used_slots == H * regions
    step = manager.step(["a", "b"])
    out, lse = step.run(0, torch.randn(2, H * 2, D), D ** -0.5)
    assert out.shape == (2, H * 2, D) and torch.isfinite(lse).all()
    manager.step(["b"])
    report = manager.report()  # two batches, three sparse rows
    assert (report["decode_steps"], report["request_steps"]) == (2, 3)
    manager.finish("a")
    manager.finish("b")
    assert manager.workspace.used_slots == 0 and manager.report()["active"] == 0
    assert manager.report()["selected_chunks"] > 0  # finished requests' counters stay
    c = list(range(1000, 1600)) + [5]
    assert manager.convert("c", c, _reader(c, 2))  # released state still cached: shared
    assert manager.report()["shared_state_hits"] == 2


def test_tenants_never_share_a_prompt_state():
    """A shared state converts faster (no build): sharing it across cache salts would tell
    one tenant that another sent the same document."""
    manager = _manager(slots=8000)
    doc = list(range(1000, 1600)) + [1, 2]
    for rid, scope in (("a", "1:x"), ("b", "1:y"), ("c", ""), ("d", "1:x")):
        assert manager.convert(rid, doc, _reader(doc, 0), scope)
    report = manager.report()
    assert report["states"] == 3 and report["shared_state_hits"] == 1  # only d joins a
    assert manager.requests["d"].layers is manager.requests["a"].layers
    assert manager.requests["b"].layers is not manager.requests["a"].layers


def test_a_request_budget_sizes_its_selection_and_shares_the_state():
    """``budget`` (custom_params.kvtier_sparse_budget) replaces budget_fraction for one
    request: its selection grows or shrinks, its state is the other budgets' state."""
    manager = _manager(slots=8000)
    doc = list(range(1000, 3000))
    for rid, budget in (("server", None), ("wide", 0.06), ("narrow", 0.03)):
        assert manager.convert(rid, doc, _reader(doc, 0), budget=budget)
    plans = {rid: r.plan for rid, r in manager.requests.items()}
    # Chunks of 4 on CPU: server 0.06 -> 120 tokens, 0.03 -> 60 (the floor is 32).
    assert [plans[r].selected_chunks for r in ("server", "wide", "narrow")] == [30, 30, 15]
    assert plans["narrow"].outlier_chunks == plans["server"].outlier_chunks
    assert manager.report()["states"] == 1 and manager.report()["shared_state_hits"] == 2
    assert manager.requests["narrow"].layers is manager.requests["server"].layers
    assert manager.requests["narrow"].region < manager.requests["server"].region


def test_a_full_workspace_leaves_the_request_dense():
    manager = _manager(slots=50)
    tokens = list(range(600))
    assert not manager.convert("a", tokens, _reader(tokens, 0))
    assert manager.report()["refused_workspace_full"] == 1 and "a" not in manager.requests


def test_host_memory_caps_new_states_and_drops_released_ones_first(caplog):
    probe = _manager()
    one = probe.state_host_bytes(probe.plan(602))
    assert one > 0
    manager = SparseManager(CONFIG.model_copy(update={"host_memory": 2 * one + one // 2}),
                            Rotary(D, inv_freq(D, 10000.0)), L, H, D, 8000, torch.float32,
                            "cpu")
    docs = {rid: [seed] * 8 + list(range(1000, 1594)) for seed, rid in enumerate("abcde")}
    assert manager.convert("a", docs["a"], _reader(docs["a"], 0))
    assert manager.host_bytes() == one  # the estimate is the state's real size
    assert manager.convert("b", docs["b"], _reader(docs["b"], 1))
    with caplog.at_level("DEBUG", logger="sgl_kvtier"):
        assert not manager.convert("c", docs["c"], _reader(docs["c"], 2))
        assert not manager.convert("d", docs["d"], _reader(docs["d"], 3))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "sparse.host_memory" in warnings[0].getMessage()
    report = manager.report()
    assert report["refused_host_memory"] == 2 and set(manager.requests) == {"a", "b"}
    # A request joining a held state needs no new host bytes.
    assert manager.convert("a2", docs["a"] + [5], _reader(docs["a"] + [5], 4))
    # A finished request's state stays for reuse, and goes when a new one needs its room.
    manager.finish("a")
    manager.finish("a2")
    assert manager.report()["states"] == 2 and manager.host_bytes() == 2 * one
    assert manager.convert("e", docs["e"], _reader(docs["e"], 5))
    assert manager.report()["states"] == 2 and manager.host_bytes() == 2 * one


def test_host_memory_defaults_to_half_the_usable_memory():
    from sgl_kvtier.sparse.host_memory import usable_memory
    assert _manager().report()["host_memory"] == usable_memory() // 2 > 0


def test_dense_layers_attend_the_whole_prompt_exactly_and_the_rest_select():
    manager = SparseManager(CONFIG.model_copy(update={"dense_layers": 1}),
                            Rotary(D, inv_freq(D, 10000.0)), L, H, D, 4000, torch.float32,
                            "cpu")
    tokens = list(range(600))
    read = _reader(tokens, 3)
    assert manager.convert("a", tokens, read)
    q = torch.randn(1, H * 2, D)
    step = manager.step(["a"])
    k, v = read(0)
    want, want_lse = partial_attention_ref(q[0].view(H, 2, D), k.transpose(0, 1),
                                           v.transpose(0, 1), D ** -0.5)
    out, lse = step.run(0, q, D ** -0.5)
    torch.testing.assert_close(out[0], want.reshape(H * 2, D), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[0], want_lse.reshape(-1), rtol=1e-5, atol=1e-5)
    assert manager.report()["selected_chunks"] == 0  # layer 0 selected nothing
    step.run(1, q, D ** -0.5)
    assert manager.report()["selected_chunks"] > 0  # layer 1 is sparse
    assert manager.device_bytes() - manager.workspace.nbytes() >= 2 * 600 * H * D * 4


def test_a_conversion_holds_one_layer_of_the_prompt_at_a_time():
    """Reading every layer before building would copy the whole prompt at once beside the
    pool (16 GiB at 128k tokens of Llama-3.1-8B shapes): each layer's read must be let go
    before the next, and none is kept once the request is converted (only copies of what
    it needs), whether its state is built or shared."""
    layers = 4
    manager = SparseManager(CONFIG.model_copy(update={"dense_layers": 1}),
                            Rotary(D, inv_freq(D, 10000.0)), layers, H, D, 8000,
                            torch.float32, "cpu")
    reads, held = [], []

    def read(layer):
        held.extend(ref for ref in reads if ref() is not None)
        k, v = torch.randn(600, H, D), torch.randn(600, H, D)
        reads.extend([weakref.ref(k), weakref.ref(v)])
        return k, v

    doc = list(range(1000, 1600))
    for rid in ("built", "shared"):
        assert manager.convert(rid, doc, read)
        held.extend(ref for ref in reads if ref() is not None)
        assert not held, f"{len(held)} reads still held"
    assert len(reads) == 2 * 2 * layers and manager.report()["shared_state_hits"] == 1
