"""The NVMe tier in a real SGLang server over HTTP (embedded model, CPU, real files):
restart, kill -9, corruption, tenants, eviction under concurrency, two servers sharing one
tier.

Every check of an output compares greedy token ids with a reference computed from scratch
(``reference`` in conftest.py): whatever the tier does, answers must not change.
"""

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serverlib import SERVER_BASE
from tierlib import NEW_TOKENS, log_lines, servers, tier, tier_yaml, wait_idle

from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

pytestmark = pytest.mark.integration


def test_restart_serves_the_prompt_from_disk(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    cold = first.generate(prompts["long"], NEW_TOKENS)
    assert cold.output_ids == reference["outputs"]["long"] and cold.cached_tokens == 0
    wait_idle(first, 8)  # 2048 prompt tokens + output: 8 whole 256-token chunks
    first.stop()

    second = servers.start(config, extra=["--enable-metrics"])
    assert log_lines(second, "NVMe tier at") and "8 chunks" in log_lines(second, "NVMe tier at")[0]
    again = second.generate(prompts["long"], NEW_TOKENS)
    assert again.output_ids == reference["outputs"]["long"]
    assert again.cached_tokens == 2047  # everything SGLang may reuse, none of it on device
    assert again.cached_details.get("storage") == 2047
    state = tier(second)
    assert state["loaded_tokens"] == 2047 and state["hits"] == 8 and state["misses"] == 0
    metrics = requests.get(f"{second.url}/metrics", timeout=30).text
    assert re.search(r'^sglang:kvtier_disk_hit_tokens_total\{tp_rank="0"\} 2047\.0$', metrics,
                     re.M), [line for line in metrics.splitlines() if "kvtier" in line]
    assert re.search(r'^sglang:kvtier_chunks\{tp_rank="0"\} 8\.0$', metrics, re.M)


def test_kill_9_while_writing_then_restart(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    # Every 4 MiB block of a chunk file waits 0.5 s first: writes take seconds, so the kill
    # below lands in the middle of one (the test checks that it did).
    first = servers.start(config, faults_spec="block:delay=0.5")
    first.generate(prompts["other"], NEW_TOKENS)
    wait_idle(first, 4)
    out = first.generate(prompts["long"], NEW_TOKENS)
    deadline = time.monotonic() + 30
    while not (in_flight := list((tmp_path / "tier").rglob("*.tmp"))):
        assert time.monotonic() < deadline, "no write was in flight to kill"
        time.sleep(0.01)
    pending = tier(first)["writes_in_flight"] + tier(first)["copies_pending"]
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.stop()
    assert out.output_ids == reference["outputs"]["long"]
    assert in_flight and pending > 0, "the kill did not land while writing"
    half_written = list((tmp_path / "tier").rglob("*.tmp"))
    assert half_written, "the half-written file is gone already"

    second = servers.start(config)
    for name in ("long", "other"):
        assert second.generate(prompts[name], NEW_TOKENS).output_ids == \
            reference["outputs"][name]
    state = tier(second)
    assert state["checksum_failures"] == 0 and state["corrupt_files"] == 0
    assert state["loaded_tokens"] >= 1023
    # The killed server's half-written files are cleared (the new server's own writes of
    # the recomputed prompt may be in flight now, under other names).
    assert not [path for path in half_written if path.exists()]
    assert state["temp_files_removed"] >= 1


def test_a_flipped_byte_is_detected_and_recomputed(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["long"], NEW_TOKENS)
    wait_idle(first, 8)
    first.stop()
    victim = sorted((tmp_path / "tier").rglob("*.kvc"))[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    second = servers.start(config)
    out = second.generate(prompts["long"], NEW_TOKENS)
    assert out.output_ids == reference["outputs"]["long"]
    assert out.cached_tokens < 2047  # the hit was given up, the prompt recomputed
    state = tier(second)
    assert state["checksum_failures"] == 1 and state["quarantined"] == 1
    assert state["load_failures"] == 1
    assert len(log_lines(second, "failed to load; recomputing")) == 1
    # Later requests get what is still good, and never the bad chunk.
    again = second.generate(prompts["long"], NEW_TOKENS)
    assert again.output_ids == reference["outputs"]["long"]
    assert tier(second)["checksum_failures"] == 1


def test_tenants_never_share_chunks(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["other"], NEW_TOKENS, cache_salt="alice")
    wait_idle(first, 4)
    first.stop()

    second = servers.start(config)
    bob = second.generate(prompts["other"], NEW_TOKENS, cache_salt="bob")
    assert bob.cached_tokens == 0 and bob.output_ids == reference["outputs"]["other"]
    second.flush_cache()  # keep bob's device copy from serving alice
    alice = second.generate(prompts["other"], NEW_TOKENS, cache_salt="alice")
    assert alice.cached_tokens == 1023 and alice.output_ids == reference["outputs"]["other"]
    assert tier(second)["loaded_tokens"] == 1023


def test_concurrent_shared_prefixes_under_eviction(servers, model_dir, clean_env, tmp_path):
    tok = load_tokenizer(model_dir)
    stems = [token_prompt(tok, 768, offset=60_000 + 5_000 * i) for i in range(4)]
    prompts = [stem + token_prompt(tok, 200, offset=90_000 + 1_000 * (4 * i + j))
               for i, stem in enumerate(stems) for j in range(4)]
    # One request at a time on a fresh server with the tier off: the single-request answers.
    logs = tmp_path / "single"
    args = ["--enable-kvtier", "--model-path", str(model_dir), *SERVER_BASE]
    with Server(args, logs / "server.log", env=clean_env) as single:
        expected = [single.generate(p, NEW_TOKENS).output_ids for p in prompts]
    # Device pool for about 6 of the 16 prompts; disk for about 30 chunks of the ~64 offered.
    config = tier_yaml(tmp_path / "tier", chunk_tokens=128, capacity="180MB")
    server = servers.start(config, extra=["--max-total-tokens", "6000",
                                          "--max-running-requests", "16"])
    with ThreadPoolExecutor(16) as pool:
        for _ in range(2):
            outputs = list(pool.map(lambda p: server.generate(p, NEW_TOKENS).output_ids,
                                    prompts))
            assert outputs == expected
    state = tier(server)
    # Both tiers really evicted: the device prefix cache and the disk.
    assert state["device_evicted_tokens"] > 0 and state["evictions"] > 0
    assert state["loaded_tokens"] > 0
    assert state["checksum_failures"] == 0 and state["load_failures"] == 0


# Sparse decode that keeps every chunk (exact keys, a CPU server's default): its answers
# are dense decode's.
EXACT_SPARSE = ("sparse:\n  enabled: true\n  min_context_tokens: 1024\n  budget_fraction: 1.0\n"
                "  budget_max_tokens: 100000\n  rank_fraction: 1.0\n")


def test_sparse_decode_over_a_prompt_restored_from_disk(servers, prompts, reference, tmp_path):
    """The tier and sparse decode on one server: a sparse request's prompt is written to
    disk before the request lets go of it, and after a restart a request over that prompt
    is built from the chunks read back, and still decodes dense decode's tokens."""
    config = tier_yaml(tmp_path / "tier") + EXACT_SPARSE
    first = servers.start(config)
    ran = first.generate(prompts["long"], NEW_TOKENS)
    assert ran.output_ids == reference["outputs"]["long"]
    assert sparse(first)["requests"] == 1 and sparse(first)["pool_tokens_released"] >= 2000
    wait_idle(first, 8)  # the prompt's 8 chunks (2047 reusable tokens)
    first.stop()

    second = servers.start(config)
    got = second.generate(prompts["long"], NEW_TOKENS)
    assert got.cached_details.get("storage") == 2047  # from disk, not recomputed
    assert sparse(second)["requests"] == 1  # and decoded sparsely from those chunks
    assert got.output_ids == reference["outputs"]["long"]
    assert tier(second)["checksum_failures"] == 0


def sparse(server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["sparse"]


def test_two_servers_share_one_tier(servers, prompts, reference, tmp_path):
    """Data-parallel replicas (or two servers of one model) on one folder: each finds what
    the other wrote, and neither refuses to start."""
    config = tier_yaml(tmp_path / "tier")
    a, b = servers.start(config), servers.start(config)
    assert a.generate(prompts["other"], NEW_TOKENS).output_ids == reference["outputs"]["other"]
    assert b.generate(prompts["long"], NEW_TOKENS).output_ids == reference["outputs"]["long"]
    wait_idle(a, 4)
    wait_idle(b, 8)
    from_b = a.generate(prompts["long"], NEW_TOKENS)
    from_a = b.generate(prompts["other"], NEW_TOKENS)
    assert from_b.output_ids == reference["outputs"]["long"]
    assert from_a.output_ids == reference["outputs"]["other"]
    assert from_b.cached_details.get("storage") == 2047
    assert from_a.cached_details.get("storage") == 1023
    assert tier(a)["discovered"] >= 8 and tier(b)["discovered"] >= 4
    folders = [p for p in (tmp_path / "tier").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["tp0-of-1"]
