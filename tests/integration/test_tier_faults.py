"""Faults of the NVMe tier in a real server over HTTP, each shown to have happened:

- ``/flush_cache`` while a write-through copy is held back: no chunk ever holds KV of
  other tokens (every chunk on disk equals the reference server's chunk of that name);
- the tier's folder stops accepting writes while serving (a file-size limit put on the
  running scheduler: EFBIG, a full disk's failure; it binds root too);
- an unexpected error at each point of the tier (``SGL_KVTIER_FAULTS``, see
  ``sgl_kvtier/tier/faults.py``), a folder of another user, a failing start-up scan.

Whatever happens, every answer equals the reference's, and the server says so once.
"""

import os
import resource

import pytest
from tierlib import (
    NEW_TOKENS,
    compare_chunks,
    log_lines,
    scheduler_pid,
    servers,
    tier,
    tier_yaml,
    wait_idle,
)

pytestmark = pytest.mark.integration


def answers_stay_right(server, prompts, reference, rounds=2, flush=True):
    for _ in range(rounds):
        for name in ("other", "long"):
            out = server.generate(prompts[name], NEW_TOKENS)
            assert out.output_ids == reference["outputs"][name], name
        if flush:
            server.flush_cache()  # next round: from disk, if the tier still serves


def test_flush_cache_never_lets_a_copy_write_other_tokens_kv(servers, prompts, reference,
                                                            tmp_path):
    # Each copy-out job waits 4 s before it reads the pool: the window in which a cache
    # reset frees its slots and another prompt is computed into them.
    server = servers.start(tier_yaml(tmp_path / "tier"), faults_spec="copy:delay=4")
    first = server.generate(prompts["other"], NEW_TOKENS)
    assert tier(server)["copies_pending"] >= 1, "the copy was not held back"
    server.flush_cache()
    second = server.generate(prompts["long"], NEW_TOKENS)  # into the freed slots
    state = wait_idle(server)
    assert first.output_ids == reference["outputs"]["other"]
    assert second.output_ids == reference["outputs"]["long"]
    assert state["copies_cancelled"] >= 1
    assert compare_chunks(tmp_path / "tier", reference["tier"]) == 8  # long's, all right


def test_writes_failing_while_serving(servers, prompts, reference, tmp_path):
    server = servers.start(tier_yaml(tmp_path / "tier"))
    server.generate(prompts["other"], NEW_TOKENS)
    assert wait_idle(server, 4)["chunks_written"] == 4
    # From now on every file the scheduler writes stops at 4 MB, below one 11.8 MB chunk.
    pid = scheduler_pid(server)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))
    answers_stay_right(server, prompts, reference)
    state = wait_idle(server)
    assert state["write_errors"] >= 1 and state["writes_enabled"] is False
    assert state["chunks_written"] == 4 and state["loaded_tokens"] >= 1023
    assert len(log_lines(server, "continuing read-only")) == 1
    assert "File too large" in log_lines(server, "continuing read-only")[0]


# Where each injected bug stops the tier, and the line that says so.
POINTS = {
    "open": "cannot use the NVMe tier",
    "match": "failed while looking up a prompt",
    "load": "failed while loading a prompt's chunks",
    "offer": "failed while offering a prompt's chunks",
    "copy": "failed while working in the background",
    "flush": "failed while finishing a batch",
    "write": "failed while working in the background",
}


@pytest.mark.parametrize("point", list(POINTS))
def test_an_unexpected_error_at_each_point(servers, prompts, reference, tmp_path, point):
    server = servers.start(tier_yaml(tmp_path / "tier"), faults_spec=f"{point}:raise")
    want = reference["outputs"]["other"]
    assert server.generate(prompts["other"], NEW_TOKENS).output_ids == want  # written
    if tier(server):
        wait_idle(server)
    server.flush_cache()
    again = server.generate(prompts["other"], NEW_TOKENS)  # a disk hit, if the tier serves
    assert again.output_ids == want
    assert server.generate(prompts["long"], NEW_TOKENS).output_ids == \
        reference["outputs"]["long"]
    lines = log_lines(server, POINTS[point])
    assert len(lines) == 1, (point, lines)
    state = tier(server)
    if point == "open":
        assert state == {}  # no tier at all
    else:
        assert state["active"] is False and state["healthy"] is False
    assert again.cached_details.get("storage", 0) == 0  # nothing served after the fault
    if point == "load":  # the fault fired on a real disk hit, which was then recomputed
        assert state["chunks_written"] >= 4 and state["loaded_tokens"] == 0


def test_a_failing_start_up_scan_serves_read_only(servers, prompts, reference, tmp_path):
    config = tier_yaml(tmp_path / "tier")
    first = servers.start(config)
    first.generate(prompts["other"], NEW_TOKENS)
    wait_idle(first, 4)
    first.stop()
    second = servers.start(config, faults_spec="scan:oserror")
    out = second.generate(prompts["other"], NEW_TOKENS)
    assert out.output_ids == reference["outputs"]["other"]
    assert out.cached_details.get("storage") == 1023  # read-only still serves what is there
    state = tier(second)
    assert state["writes_enabled"] is False and state["active"] is True
    assert len(log_lines(second, "cannot scan")) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="a folder of another user needs root "
                                              "(CI runs as root)")
def test_a_tier_folder_of_another_user_is_refused(servers, prompts, reference, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    os.chown(shared, 65534, 65534)
    server = servers.start(tier_yaml(shared))
    answers_stay_right(server, prompts, reference, rounds=1)
    lines = log_lines(server, "cannot use the NVMe tier")
    assert len(lines) == 1 and "belongs to uid 65534" in lines[0]
    assert tier(server) == {} and not list(shared.iterdir())
