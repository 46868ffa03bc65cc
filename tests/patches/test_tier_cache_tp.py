"""Tensor parallelism: an error on one rank never hangs the group, and ranks agree.

SGLang's CPU engine cannot run ``--tp 2`` from its PyPI wheels here, so two processes
joined over gloo drive ``KVTierRadixCache`` through the calls SGLang's per-rank schedulers
make (``match_prefix``, ``init_load_back``, ``flush_pending_backups``), each with its own
store. Before every rank reached every collective, the lookup and load scenarios below
left the healthy rank waiting in ``all_reduce`` until gloo's timeout.
"""

import multiprocessing
import queue
import time

import pytest
import tp_ranks

from sgl_kvtier.harness.server import free_port

WHOLE = 4 * tp_ranks.CHUNK  # the 4 stored chunks; the prompt's last token is recomputed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario's outcome per rank, from one pair of processes."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    folder = tmp_path_factory.mktemp("tp")
    port = free_port()
    procs = [ctx.Process(target=tp_ranks.main, args=(r, port, str(folder), results))
             for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, scenarios = results.get(timeout=240)
            out[rank] = scenarios
    except queue.Empty:
        pytest.fail("a rank never reported: the group hung")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    # Hanging until gloo's timeout in any scenario would take longer than this.
    assert time.monotonic() - start < 120
    for rank in out.values():
        errors = {name: r["error"] for name, r in rank.items() if "error" in r}
        assert not errors, errors
    assert set(out[0]) == set(tp_ranks.SCENARIOS), out
    return out


def both(ranks, scenario: str) -> list[dict]:
    return [ranks[0][scenario], ranks[1][scenario]]


def test_a_hit_is_the_shortest_among_ranks(ranks):
    for r in both(ranks, "shortest_hit"):
        assert r == {"hit": 2 * tp_ranks.CHUNK, "loaded": 2 * tp_ranks.CHUNK, "active": True}


def test_a_lookup_error_on_one_rank_turns_the_tier_off_on_both(ranks):
    for r in both(ranks, "lookup_error"):
        assert r == {"hit": 0, "again": 0, "active": False}


def test_a_load_error_on_one_rank_means_recompute_on_both(ranks):
    for r in both(ranks, "load_error"):
        assert r == {"hit": WHOLE, "loaded": 0, "active": False, "slots_returned": True}


def test_a_background_error_on_one_rank_is_agreed_at_the_next_lookup(ranks):
    r0, r1 = both(ranks, "background_error")
    assert r0 == {"hit": 0, "active": False, "healthy": False}
    assert r1 == {"hit": 0, "active": False, "healthy": False}


def test_a_rank_without_a_tier_switches_it_off_everywhere(ranks):
    for r in both(ranks, "open_failure"):
        assert r == {"hit": 0, "active": False}


def test_loads_in_the_background_are_admitted_in_the_same_round_on_every_rank(ranks):
    r0, r1 = both(ranks, "async_uneven_ranks")
    assert r0["rounds"] == r1["rounds"] > 0  # the fast rank waited for the slow one
    for r in (r0, r1):
        assert r["prefix"] == WHOLE and r["active"] and r["pending"] == 0


def test_a_background_load_error_on_one_rank_means_recompute_on_both(ranks):
    for r in both(ranks, "async_load_error"):
        assert r == {"rounds": 0, "prefix": 0, "host_hit": 0, "active": False,
                     "slots_returned": True}
