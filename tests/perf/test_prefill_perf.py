"""Bidirectional prefill against the better single method, in a real server, at the read
bandwidth where computing and loading a 2048-token prefix take about the same time.

One server (SmolLM2-135M, float32, CPU). Each round serves the same prompt, its prefix on
disk only, three ways chosen per request (``custom_params.kvtier_prefill``): recomputed,
loaded whole, bidirectionally; rounds alternate the order. The gate is the median
bidirectional time to first token over the better median single method, in this run."""

import statistics
import time

import pytest
from serverlib import SERVER_BASE
from timing import gate

from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

pytestmark = pytest.mark.integration
# Loading all 2047 tokens (94 MB in float32) at 20 MB/s takes ~4.7 s; computing them ~5 s.
TIE_BYTES_PER_S = 20_000_000
METHODS = ("compute", "load", "bidirectional")


def _tier(server):
    return server.server_info()["internal_states"][0]["kvtier"]["tier"]


@pytest.fixture(scope="module")
def tie_server(model_dir, clean_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefill-perf")
    config = folder / "kvtier.yaml"
    config.write_text(f"tier:\n  enabled: true\n  path: {folder / 'tier'}\n"
                      f"  admission: always\n  read_bandwidth_limit: {TIE_BYTES_PER_S}\n"
                      "prefill:\n  enabled: true\n  min_prefix_tokens: 1024\n")
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model_dir),
            *SERVER_BASE]
    prompt = token_prompt(load_tokenizer(model_dir), 2048, offset=61_000)
    with Server(args, folder / "server.log", env=clean_env) as server:
        expected = server.generate(prompt, 4).output_ids  # computed and written through
        deadline = time.monotonic() + 120
        while _tier(server)["chunks"] < 7 or _tier(server)["writes_in_flight"]:
            assert time.monotonic() < deadline, _tier(server)
            time.sleep(0.2)
        yield server, prompt, expected


def test_bidirectional_prefill_at_the_tie_point(benchmark, tie_server):
    """Where neither method wins, doing both must cut time to first token well below either
    (Cake's point; the issue's goal is 1.6x faster, i.e. a ratio of 0.625)."""
    # Bidirectional over the better single method; measured 0.60 here (2 AMD EPYC cores,
    # float32: 2.82 s against 4.70 s), 0.59 at the 4096-token sweep's tie point (README).
    MAX_RATIO = 0.9
    server, prompt, expected = tie_server
    times = {m: [] for m in METHODS}

    def serve(method: str) -> float:
        server.flush_cache()  # the prefix is on disk only
        gen = server.generate(prompt, 4, custom_params={"kvtier_prefill": method})
        assert gen.output_ids == expected, method
        return gen.ttft_s

    for i in range(3):
        for method in (METHODS if i % 2 == 0 else METHODS[::-1]):
            times[method].append(serve(method))
    benchmark.pedantic(lambda: times["bidirectional"].append(serve("bidirectional")),
                       rounds=1, iterations=1)
    median = {m: statistics.median(v) for m, v in times.items()}
    best = min(median["compute"], median["load"])
    report = _tier(server)["prefill"]["recent"][-1]
    print({m: [round(t, 2) for t in v] for m, v in times.items()}, "split", report["split"])
    assert report["computed_tokens"] > 0 and report["loaded_tokens"] > 0  # both sides worked
    gate(benchmark, "bidirectional / better single method, TTFT at the tie point",
         {"ratio": median["bidirectional"] / best, "new_s": median["bidirectional"],
          "reference_s": best, "rounds": 3}, MAX_RATIO)
