"""The NVMe tier in a real SGLang server over HTTP (embedded model, CPU, real files).

Every check of an output compares greedy token ids with a reference computed without the
tier: whatever the tier does (hit, miss, corrupt chunk, failed write), answers must not
change.
"""

import os
import re
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serverlib import SERVER_BASE
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

pytestmark = pytest.mark.integration
NEW_TOKENS = 8


def tier_yaml(path, **settings) -> str:
    lines = ["tier:", "  enabled: true", f"  path: {path}"]
    lines += [f"  {k}: {v}" for k, v in {"admission": "always", **settings}.items()]
    return "\n".join(lines) + "\n"


class TierServers:
    """Starts servers with a tier config in one test's folder; stops them all at the end."""

    def __init__(self, model_dir, env, folder):
        self.model_dir, self.env, self.folder, self.count = model_dir, env, folder, 0
        self.running: list[Server] = []

    def start(self, yaml_text: str, extra=(), rlimits=None) -> Server:
        self.count += 1
        config = self.folder / f"kvtier-{self.count}.yaml"
        config.write_text(yaml_text)
        args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path",
                str(self.model_dir), *SERVER_BASE, *extra]
        server = Server(args, self.folder / f"server-{self.count}.log", env=self.env,
                        rlimits=rlimits)
        self.running.append(server.start())
        return server

    def stop_all(self):
        for server in self.running:
            server.stop()


@pytest.fixture
def servers(model_dir, clean_env, tmp_path):
    s = TierServers(model_dir, clean_env, tmp_path)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = load_tokenizer(model_dir)
    return {"long": token_prompt(tok, 2048, offset=31_000),
            "other": token_prompt(tok, 1024, offset=52_000)}


@pytest.fixture(scope="module")
def reference(model_dir, clean_env, tmp_path_factory, prompts):
    """Greedy outputs of every prompt from a server without the tier, one at a time."""
    logs = tmp_path_factory.mktemp("reference")
    args = ["--enable-kvtier", "--model-path", str(model_dir), *SERVER_BASE]
    with Server(args, logs / "server.log", env=clean_env) as server:
        return {name: server.generate(p, NEW_TOKENS).output_ids for name, p in prompts.items()}


def tier(server: Server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["tier"]


def wait_written(server: Server, chunks: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = tier(server)
        if state["chunks"] >= chunks and state["write_queue_depth"] == 0:
            return state
        time.sleep(0.2)
    raise AssertionError(f"tier holds {state['chunks']} chunks, expected {chunks}: {state}")


def log_lines(server: Server, fragment: str) -> list[str]:
    return [l for l in server.log_path.read_text().splitlines() if fragment in l]


def test_restart_serves_the_prompt_from_disk(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    cold = first.generate(prompts["long"], NEW_TOKENS)
    assert cold.output_ids == reference["long"] and cold.cached_tokens == 0
    wait_written(first, 8)  # 2048 prompt tokens + output: 8 whole 256-token chunks
    first.stop()

    second = servers.start(config, extra=["--enable-metrics"])
    assert log_lines(second, "NVMe tier at") and "8 chunks" in log_lines(second, "NVMe tier at")[0]
    again = second.generate(prompts["long"], NEW_TOKENS)
    assert again.output_ids == reference["long"]
    assert again.cached_tokens == 2047  # everything SGLang may reuse, none of it on device
    assert again.cached_details.get("host") == 2047
    state = tier(second)
    assert state["loaded_tokens"] == 2047 and state["hits"] == 8 and state["misses"] == 0
    metrics = requests.get(f"{second.url}/metrics", timeout=30).text
    assert re.search(r'^sglang:kvtier_disk_hit_tokens_total\{tp_rank="0"\} 2047\.0$', metrics,
                     re.M), [l for l in metrics.splitlines() if "kvtier" in l]
    assert re.search(r'^sglang:kvtier_chunks\{tp_rank="0"\} 8\.0$', metrics, re.M)


def test_kill_9_while_writing_then_restart(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["other"], NEW_TOKENS)
    wait_written(first, 4)
    # Kill the whole server the moment the next prompt's answer is out, while its chunks
    # are being copied and written.
    out = first.generate(prompts["long"], NEW_TOKENS)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.stop()
    assert out.output_ids == reference["long"]

    second = servers.start(config)
    for name in ("long", "other"):
        assert second.generate(prompts[name], NEW_TOKENS).output_ids == reference[name]
    state = tier(second)
    assert state["checksum_failures"] == 0 and state["loaded_tokens"] >= 1023
    assert not list((tmp_path / "tier").rglob("*.tmp"))  # half-written files cleared


def test_a_flipped_byte_is_detected_and_recomputed(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["long"], NEW_TOKENS)
    wait_written(first, 8)
    first.stop()
    victim = sorted((tmp_path / "tier").rglob("*.kvc"))[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    second = servers.start(config)
    out = second.generate(prompts["long"], NEW_TOKENS)
    assert out.output_ids == reference["long"]
    assert out.cached_tokens < 2047  # the hit was given up, the prompt recomputed
    state = tier(second)
    assert state["checksum_failures"] == 1 and state["quarantined"] == 1
    assert state["load_failures"] == 1
    assert len(log_lines(second, "failed to load; recomputing")) == 1
    # Later requests get what is still good, and never the bad chunk.
    again = second.generate(prompts["long"], NEW_TOKENS)
    assert again.output_ids == reference["long"]
    assert tier(second)["checksum_failures"] == 1


@pytest.mark.parametrize("failure", ["unwritable", "file_size_limit"])
def test_writes_that_fail_leave_the_server_serving(servers, prompts, reference, tmp_path,
                                                   failure):
    if failure == "unwritable":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("a file where the tier's parent directory should be")
        server = servers.start(tier_yaml(blocker / "tier"))
    else:
        # Every file the server writes is capped at 4 MB, below one 11.8 MB chunk: writes
        # fail mid-file, as on a full disk.
        server = servers.start(tier_yaml(tmp_path / "tier"),
                               rlimits={resource.RLIMIT_FSIZE: 4 << 20})
    for _ in range(2):
        for name in ("long", "other"):
            assert server.generate(prompts[name], NEW_TOKENS).output_ids == reference[name]
        server.flush_cache()
    state = tier(server)
    assert state["writes_enabled"] is False and state["chunks_written"] == 0
    assert len(log_lines(server, "continuing read-only")) == 1


def test_tenants_never_share_chunks(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["other"], NEW_TOKENS, cache_salt="alice")
    wait_written(first, 4)
    first.stop()

    second = servers.start(config)
    bob = second.generate(prompts["other"], NEW_TOKENS, cache_salt="bob")
    assert bob.cached_tokens == 0 and bob.output_ids == reference["other"]
    second.flush_cache()  # keep bob's device copy from serving alice
    alice = second.generate(prompts["other"], NEW_TOKENS, cache_salt="alice")
    assert alice.cached_tokens == 1023 and alice.output_ids == reference["other"]
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
    assert state["evictions"] > 0 and state["loaded_tokens"] > 0
    assert state["checksum_failures"] == 0 and state["load_failures"] == 0
