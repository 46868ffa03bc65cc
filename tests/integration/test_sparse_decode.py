"""Sparse decode in a real SGLang server over HTTP (embedded model, CPU).

Two servers. ``exact`` keeps every chunk and low-rank keys of full rank (``keys: lowrank``,
ShadowKV's path, which a CPU server does not take by default), so sparse decode must give
dense decode's answers token for token: that checks the whole path (RoPE undone and redone,
state built from the pool, page table, merge with the decode tokens) in a mixed batch of
dense and sparse requests, two of which share one document's state. ``tight`` has the
default sizes (on CPU: exact keys, chunks of 4) and a small KV pool: a decoding sparse
request's prompt must really be evicted while it decodes, and the request must not notice;
and the room a sparse request gives back must admit a queued prompt at once, not when some
request ends.
"""

import itertools
import re
import threading
import time

import pytest
import requests
from serverlib import SERVER_BASE

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server
from sgl_kvtier.sparse.budget import plan_for

pytestmark = pytest.mark.integration
DENSE = {"custom_params": {"kvtier_sparse": False}}
# host_memory: room for one 1,800-token document's state (38.3 MB: 30 layers x 1,664 middle
# tokens x 3 heads x 64 x 4 bytes), not two.
EXACT = ("sparse:\n  enabled: true\n  min_context_tokens: 1024\n  budget_fraction: 1.0\n"
         "  budget_max_tokens: 100000\n  keys: lowrank\n  rank_fraction: 1.0\n"
         "  host_memory: 55MiB\n  dense_answer_tokens: 3\n")
# The three copy heads eval/retrieval_heads.py names for the embedded model.
TIGHT = ("sparse:\n  enabled: true\n  min_context_tokens: 1024\n"
         "  exact_score_heads: [[7, 2], [17, 1], [18, 2]]\n")


def _server(model_dir, env, folder, yaml_text, extra=()):
    config = folder / "kvtier.yaml"
    config.write_text(yaml_text)
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model_dir),
            *SERVER_BASE, *extra]
    return Server(args, folder / "server.log", env=env).start()


def _sparse(server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["sparse"]


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def exact(model_dir, clean_env, tmp_path_factory):
    # Without the overlap scheduler the tree's offer always precedes a request's first
    # decode step: the one order in which converting at that step would be possible.
    server = _server(model_dir, clean_env, tmp_path_factory.mktemp("sparse-exact"), EXACT,
                     ["--enable-metrics", "--disable-overlap-schedule"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tight(model_dir, clean_env, tmp_path_factory):
    # 5000 slots: one 2048-token prompt decoding plus two more cannot all stay resident.
    folder = tmp_path_factory.mktemp("sparse-tight")
    server = _server(model_dir, clean_env, folder, TIGHT, ["--max-total-tokens", "5000"])
    yield server
    server.stop()


def _concurrently(server, jobs):
    """Run ``(prompt, tokens, sampling)`` jobs at once; their generations, in order."""
    out = [None] * len(jobs)

    def one(i, prompt, tokens, sampling):
        out[i] = server.generate(prompt, tokens, **sampling)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    return out


def test_full_budget_sparse_decode_is_dense_decode_in_a_mixed_batch(exact, tok):
    doc = token_prompt(tok, 1800, offset=31_000)
    long_a, long_b = (doc + tok.encode(q, add_special_tokens=False)
                      for q in (" Which city is named first?", " Who wrote this, and when?"))
    short = token_prompt(tok, 300, offset=52_000)
    dense = [exact.generate(p, 32, **DENSE) for p in (long_a, long_b, short)]
    before = _sparse(exact)
    assert before["requests"] == 0  # the dense requests opted out
    got = _concurrently(exact, [(long_a, 32, {}), (long_b, 32, {}), (short, 32, {})])
    after = _sparse(exact)
    assert after["requests"] == 2  # the two long ones; the short one stayed dense
    assert after["shared_state_hits"] == 1  # one document, one state, two questions
    assert after["pool_tokens_released"] >= 2 * 1700
    assert got[1].cached_tokens >= 1700  # the prefix cache still serves the document
    for g, d in zip(got, dense):
        assert g.output_ids == d.output_ids
    # Each long request decodes all but its first 3 tokens (EXACT's dense_answer_tokens)
    # sparsely, in batches that may hold both: rows counted apart from batches.
    rows = sum(len(g.output_ids) - 3 for g in got[:2])
    assert after["request_steps"] == rows and rows / 2 <= after["decode_steps"] <= rows
    metrics = _metrics(exact)
    assert metrics["kvtier_sparse_requests_total"] == 2, metrics
    assert metrics["kvtier_sparse_request_steps_total"] == rows
    assert metrics["kvtier_sparse_pool_tokens_released_total"] == after["pool_tokens_released"]
    assert metrics["kvtier_sparse_gathered_bytes_total"] == after["gathered_bytes"] > 0
    assert metrics["kvtier_sparse_host_bytes"] == after["host_bytes"] > 0


def test_a_document_shares_its_state_only_within_a_tenant(exact, tok):
    doc = token_prompt(tok, 1800, offset=37_000)
    ask = [doc + tok.encode(q, add_special_tokens=False)
           for q in (" Name the first place.", " Name the last place.")]
    dense = exact.generate(ask[1], 16, cache_salt="bob", **DENSE)
    before = _sparse(exact)
    exact.generate(ask[0], 16, cache_salt="alice")
    got = exact.generate(ask[1], 16, cache_salt="bob")
    after = _sparse(exact)
    assert after["requests"] - before["requests"] == 2  # both decoded sparsely
    assert after["shared_state_hits"] == before["shared_state_hits"]  # each built its own
    assert got.output_ids == dense.output_ids


def test_a_state_beyond_host_memory_leaves_its_request_dense(exact, tok):
    first, second = (token_prompt(tok, 1800, offset=o) for o in (71_000, 81_000))
    dense = [exact.generate(p, 24, **DENSE) for p in (first, second)]
    before = _sparse(exact)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        g=exact.generate(first, 400, ignore_eos=True)))
    thread.start()
    deadline = time.monotonic() + 300
    while _sparse(exact)["active"] == 0:
        assert time.monotonic() < deadline and thread.is_alive(), "never went sparse"
        time.sleep(0.2)
    held = _sparse(exact)["host_bytes"]
    assert held < before["host_memory"] < 2 * held  # room for one such state, not two
    got = exact.generate(second, 24)
    still_running = thread.is_alive()
    thread.join()
    assert still_running, "the first request ended before the second came: nothing was full"
    after = _sparse(exact)
    assert after["refused_host_memory"] - before["refused_host_memory"] == 1
    assert after["requests"] - before["requests"] == 1  # only the first went sparse
    assert got.output_ids == dense[1].output_ids  # the refused one decoded densely
    assert result["g"].output_ids[:24] == dense[0].output_ids
    assert exact.log_path.read_text().count("stays dense: its prompt state needs") == 1
    metrics = _metrics(exact)
    assert metrics["kvtier_sparse_refused_host_memory_total"] == after["refused_host_memory"]


def _metrics(server) -> dict[str, float]:
    """The ``sglang:kvtier_sparse_*`` series of ``/metrics``, by name."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    found = re.findall(r'^sglang:(kvtier_sparse_\w+)\{tp_rank="0"\} (\S+)$', text, re.M)
    return {name: float(value) for name, value in found}


def test_a_decoding_requests_prompt_is_evicted_under_it(tight, tok):
    long = token_prompt(tok, 2048, offset=31_000)
    others = [token_prompt(tok, 2048, offset=o) for o in (41_000, 61_000)]
    alone = tight.generate(long, 160)
    tight.flush_cache()
    result = {}
    thread = threading.Thread(target=lambda: result.update(g=tight.generate(long, 160)))
    thread.start()
    deadline = time.monotonic() + 300
    while _sparse(tight)["active"] == 0 or tight_released(tight) < 2 * 2048:
        assert time.monotonic() < deadline and thread.is_alive(), "never went sparse"
        time.sleep(0.2)
    for prompt in others:  # both need room the held prompt would otherwise take
        tight.generate(prompt, 4)
    probe = tight.generate(long, 1, **DENSE)  # while the long request still decodes
    still_running = thread.is_alive()
    thread.join()
    assert still_running, "the long request ended before the probe; the test proves nothing"
    assert probe.cached_tokens < 2048 - 256, probe.cached_tokens  # its prompt was evicted
    assert result["g"].output_ids == alone.output_ids


def tight_released(server) -> int:
    return _sparse(server)["pool_tokens_released"]


def _decoding_together(server, prompts, tokens, sampling) -> int:
    """Send the prompts at once; the most whose decodes (first token to last) overlap."""
    spans = [None] * len(prompts)

    def one(i):
        start = time.perf_counter()
        g = server.generate(prompts[i], tokens, ignore_eos=True, **sampling)
        spans[i] = (start + g.token_times[0], start + g.token_times[-1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    return max(itertools.accumulate(d for _, d in events))


def test_released_room_admits_a_queued_prompt_while_others_decode(tight, tok):
    # 5000 slots hold two 2048-token prompts, not three: densely the third waits for one to
    # finish (two decode together); sparse requests give their prompts back once their dense
    # answer tokens are out (4, the default), and the third must be admitted then (three
    # decode together).
    def three(base):
        return [token_prompt(tok, 2048, offset=base + 7_001 * i) for i in range(3)]

    tight.flush_cache()
    assert _decoding_together(tight, three(100_000), 48, DENSE) == 2
    tight.flush_cache()
    released = tight_released(tight)
    assert _decoding_together(tight, three(200_000), 48, {}) == 3
    assert tight_released(tight) - released >= 3 * 2000


def test_a_request_chooses_its_budget_and_shares_the_state(tight, tok):
    """custom_params.kvtier_sparse_budget sizes one request's selection (how an evaluation
    asks one prompt at several budgets, prefilled and built once); a malformed option is
    refused with HTTP 400 naming the key, and the server goes on serving."""
    prompt = token_prompt(tok, 2048, offset=301_000)
    config = SparseConfig(enabled=True, min_context_tokens=1024).resolved("cpu")
    chunks = {b: plan_for(config.model_copy(update={"budget_fraction": b}), len(prompt), 3,
                          64).selected_chunks for b in (config.budget_fraction, 0.5)}
    assert chunks[0.5] > 2 * chunks[config.budget_fraction]  # the floor does not hide it
    seen, outputs = [_sparse(tight)], []
    for params in ({}, {"kvtier_sparse_budget": 0.5}):
        outputs.append(tight.generate(prompt, 8, ignore_eos=True, custom_params=params))
        seen.append(_sparse(tight))
    selected = [b["selected_chunks"] - a["selected_chunks"] for a, b in zip(seen, seen[1:])]
    # The same steps, layers and heads each time: the totals scale with the per-step choice.
    assert selected[0] * chunks[0.5] == selected[1] * chunks[config.budget_fraction] > 0
    assert seen[-1]["requests"] - seen[0]["requests"] == 2
    assert seen[-1]["shared_state_hits"] - seen[0]["shared_state_hits"] == 1  # built once
    for params, fragment in (({"kvtier_sparse_budget": 7}, "kvtier_sparse_budget must be"),
                             ({"kvtier_sparse_budget": "wide"}, "got 'wide'"),
                             ({"kvtier_sparse": "no"}, "kvtier_sparse must be true or false"),
                             ({"kvtier_sparse_dense_tokens": 1},
                              "kvtier_sparse_dense_tokens must be an integer of at least 2")):
        resp = requests.post(f"{tight.url}/generate", timeout=60, json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 4,
                                                     "custom_params": params}})
        assert resp.status_code == 400 and fragment in resp.text, (resp.status_code, resp.text)
    assert _sparse(tight)["requests"] == seen[-1]["requests"]  # none was queued
    again = tight.generate(prompt, 8, ignore_eos=True)
    assert again.output_ids == outputs[0].output_ids


@pytest.mark.parametrize("overlap", [True, False])
def test_a_request_goes_sparse_after_its_dense_answer_tokens(overlap, tight, exact, tok):
    """n output tokens, the first d dense: the prefill gives one, d - 1 decode steps are
    dense, n - d sparse; d is the server's sparse.dense_answer_tokens (``tight``: the
    default 4, ``exact``: 3) or the request's kvtier_sparse_dense_tokens. Under the
    overlap scheduler (``tight``) the tree's offer may land before or after a request's
    first decode step; converting at the second at the earliest keeps outputs independent
    of that race. Without it (``exact``) the offer is always in time for the first step,
    so a conversion there would show as n - 1 sparse steps at d = 2."""
    server, default = (tight, 4) if overlap else (exact, 3)
    for i, dense in enumerate((None, 2, 5, 8)):
        params = {} if dense is None else {"kvtier_sparse_dense_tokens": dense}
        before = _sparse(server)
        server.generate(token_prompt(tok, 2048, offset=401_000 + 5_003 * i), 8,
                        ignore_eos=True, custom_params=params)
        after = _sparse(server)
        sparse_steps = 8 - (dense or default)
        # d = 8: every token is out before a conversion would be due; it never happens.
        assert after["requests"] - before["requests"] == (sparse_steps > 0), dense
        assert after["decode_steps"] - before["decode_steps"] == sparse_steps, dense


def test_the_named_heads_are_scored_from_their_exact_keys(tight, tok):
    before = _sparse(tight)
    tight.generate(token_prompt(tok, 2048, offset=501_000), 8, ignore_eos=True)
    after = _sparse(tight)
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps == 8 - 4  # the first 4 answer tokens are dense (the default)
    # Three (layer, KV head) pairs, each scored once per sparse step.
    assert after["exact_scored"] - before["exact_scored"] == 3 * steps
