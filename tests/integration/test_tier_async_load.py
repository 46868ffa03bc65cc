"""A disk hit loads on the tier's loader thread while the scheduler keeps serving: a running
decode keeps producing tokens, the hit's request waits in a loading state and is then
served from disk with the same answer, and a client leaving mid-load frees everything.
With ``tier.async_load: false`` the same hit loads inside the scheduler step instead.

One server (reads throttled so that a 2048-token hit takes about 2 s) shared by the tests,
and one more with the background loads off."""

import threading
import time

import pytest
import requests
from serverlib import SERVER_BASE
from tierlib import NEW_TOKENS, servers, tier, tier_yaml, wait_idle

from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

pytestmark = pytest.mark.integration
READ_BYTES_PER_S = 40_000_000  # the 2048-token hit is 94 MB in float32: ~2.4 s


@pytest.fixture(scope="module")
def server(model_dir, clean_env, tmp_path_factory, prompts):
    folder = tmp_path_factory.mktemp("async-load")
    config = folder / "kvtier.yaml"
    config.write_text(tier_yaml(folder / "tier", read_bandwidth_limit=READ_BYTES_PER_S))
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model_dir),
            *SERVER_BASE]
    with Server(args, folder / "server.log", env=clean_env) as s:
        s.generate(prompts["long"], NEW_TOKENS)  # computed once, written through
        wait_idle(s, chunks=8)
        yield s


class Watch(threading.Thread):
    """Polls the tier's counters until stopped; remembers the most loads seen pending."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.stop, self.most_pending = server, threading.Event(), 0

    def run(self):
        while not self.stop.is_set():
            self.most_pending = max(self.most_pending, tier(self.server)["loads_pending"])
            time.sleep(0.05)


def hit_during_decode(server, prompts, model_dir):
    """Send the long prompt (on disk only) while a short request decodes 200 tokens.

    Returns the hit's Generation, the most loads seen pending meanwhile, and the longest
    gap between decode tokens while the hit waited, as a fraction of the hit's TTFT."""
    server.flush_cache()  # the long prompt is now on disk only
    short = token_prompt(load_tokenizer(model_dir), 48, offset=7_000)
    decode = {}

    def stream():
        decode["start"] = time.perf_counter()
        decode["gen"] = server.generate(short, 200, ignore_eos=True)

    thread, watch = threading.Thread(target=stream), Watch(server)
    thread.start()
    time.sleep(1.0)
    watch.start()
    sent = time.perf_counter()
    hit = server.generate(prompts["long"], NEW_TOKENS)
    watch.stop.set()
    thread.join()
    watch.join()
    arrivals = [decode["start"] + t for t in decode["gen"].token_times]
    loaded_at = sent + hit.ttft_s
    assert arrivals[-1] > loaded_at, "the decode ended before the load: lengthen it"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > sent and a < loaded_at]
    assert gaps
    print(f"longest decode gap / hit TTFT: {max(gaps) / hit.ttft_s:.3f} ({len(gaps)} gaps)")
    return hit, watch.most_pending, max(gaps) / hit.ttft_s, len(gaps)


def test_decode_keeps_going_while_a_hit_loads(server, prompts, reference, model_dir):
    hit, most_pending, gap, gaps = hit_during_decode(server, prompts, model_dir)
    assert hit.output_ids == reference["outputs"]["long"]
    assert hit.cached_details.get("storage") == 2047  # it really came from disk
    assert most_pending == 1  # ... through the loader, seen waiting while it loaded
    # Loaded inside the scheduler step, the decode stops for the whole load (the test
    # below); in the background the longest gap was 0.12 of the hit's TTFT here.
    assert gap <= 0.25
    assert gaps >= 5


def test_with_async_load_off_the_hit_loads_inside_the_scheduler_step(servers, prompts,
                                                                      reference, model_dir):
    """``tier.async_load: false``: SGLang's own load-back path (``init_load_back``) reads
    the hit inside the scheduler step. Same answer from disk; no load ever waits on the
    loader thread, and the running decode stalls for the read instead."""
    server = servers.start(tier_yaml(servers.folder / "tier", async_load="false",
                                     read_bandwidth_limit=READ_BYTES_PER_S))
    assert tier(server)["async_load"] is False
    server.generate(prompts["long"], NEW_TOKENS)  # computed once, written through
    wait_idle(server, chunks=8)
    before = tier(server)
    hit, most_pending, gap, _ = hit_during_decode(server, prompts, model_dir)
    assert hit.output_ids == reference["outputs"]["long"]
    assert hit.cached_details.get("storage") == 2047  # it really came from disk
    assert tier(server)["loaded_tokens"] - before["loaded_tokens"] == 2047
    assert most_pending == 0  # never queued on the loader thread
    # The decode waited out the read: 0.96 of the hit's TTFT in eval/load_while_decoding.py.
    assert gap >= 0.5


def test_a_client_leaving_while_its_hit_loads_frees_everything(server, prompts, reference):
    server.flush_cache()
    before = tier(server)
    body = {"input_ids": prompts["long"], "stream": True,
            "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0}}
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=60):
        deadline = time.monotonic() + 30
        while tier(server)["loads_pending"] == 0:  # leave only once the load is running
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The connection is closed: SGLang aborts the waiting request, the tier its load.
    deadline = time.monotonic() + 30
    while (state := tier(server))["loads_pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["loads_cancelled"] == before["loads_cancelled"] + 1  # the abort landed
    assert state["loaded_tokens"] == before["loaded_tokens"]
    again = server.generate(prompts["long"], NEW_TOKENS)  # slots and prefix were let go
    assert again.output_ids == reference["outputs"]["long"]
    assert again.cached_details.get("storage") == 2047
    log = server.log_path.read_text().lower()
    assert "leak" not in log and "traceback" not in log
