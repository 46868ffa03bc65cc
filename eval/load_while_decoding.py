"""Does loading a disk hit stop the other requests? Inter-token latency of a running decode
while another request's 4k-token prompt comes back from a throttled tier.

    .venv/bin/python eval/load_while_decoding.py --tokens 4096 --read-mbps 50

For each ``tier.async_load`` setting (``false``: the hit is read inside the scheduler step,
as before issue 10; ``true``: on the loader thread while the scheduler keeps running), one
server with the tier (``admission: always``, reads capped at ``--read-mbps``):

1. computes the long prompt once and writes it through, then ``/flush_cache`` leaves it on
   disk only;
2. streams a decode request (a short prompt, ``--decode-tokens`` tokens, EOS ignored);
3. one second into that stream, sends the long prompt, which now loads from disk.

It reports the decode's inter-token gaps before the long prompt arrived and while it was
loading (until its first token), and the long prompt's time to first token. Ratios within
one run; the machine (CPU, bf16 or not) is printed with them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serverlib import SERVER_BASE
from tier_restore import _wait_written

from sgl_kvtier.eval.records import provenance
from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server


def _one_setting(folder: Path, async_load: bool, tokens: int, read_mbps: float,
                 decode_tokens: int) -> dict:
    config = folder / f"kvtier-{async_load}.yaml"
    config.write_text(f"tier:\n  enabled: true\n  path: {folder / 'tier'}\n  admission: always\n"
                      f"  read_bandwidth_limit: {int(read_mbps * 1e6)}\n"
                      f"  async_load: {str(async_load).lower()}\n")
    model = model_path("smollm2")
    tok = load_tokenizer(model)
    long_prompt = token_prompt(tok, tokens, offset=90_000)
    short_prompt = token_prompt(tok, 64, offset=5_000)
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model),
            *SERVER_BASE]
    with Server(args, folder / f"server-{async_load}.log") as server:
        server.generate(long_prompt, 1)
        _wait_written(server)
        server.flush_cache()
        decode: dict = {}

        def stream() -> None:
            decode["start"] = time.perf_counter()
            decode["gen"] = server.generate(short_prompt, decode_tokens, ignore_eos=True)

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(1.0)
        sent = time.perf_counter()
        hit = server.generate(long_prompt, 1)
        thread.join()
    assert hit.cached_details.get("storage") == tokens - 1, hit.cached_details
    # Token arrival times of the decode, on the same clock as `sent`.
    arrivals = [decode["start"] + t for t in decode["gen"].token_times]
    first_of_hit = sent + hit.ttft_s
    gaps_before = [b - a for a, b in zip(arrivals, arrivals[1:]) if b <= sent]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > sent and a < first_of_hit]
    if len(gaps_before) < 3 or not during or arrivals[-1] < first_of_hit:
        raise RuntimeError("the decode did not span the load: raise --decode-tokens")
    base = statistics.median(gaps_before)
    return {"async_load": async_load, "gap_before_s": base, "max_gap_during_s": max(during),
            "median_gap_during_s": statistics.median(during), "tokens_during": len(during),
            "hit_ttft_s": hit.ttft_s, "max_over_before": max(during) / base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eval/load_while_decoding.py",
        description="Inter-token latency of a running decode while another request loads "
                    "a disk hit, with the tier's loads in the scheduler step and in the "
                    "background, in one run.")
    parser.add_argument("--tokens", type=int, default=4096, help="the disk hit's prompt length")
    parser.add_argument("--read-mbps", type=float, default=50.0,
                        help="tier.read_bandwidth_limit in MB/s (default 50: a 4096-token "
                             "hit of the embedded model in float32, 189 MB, takes ~4 s)")
    parser.add_argument("--decode-tokens", type=int, default=400,
                        help="tokens the running decode generates (it must outlast the load)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtier-itl-", dir="/var/tmp") as folder:
        for async_load in (False, True):
            rows.append(_one_setting(Path(folder), async_load, args.tokens, args.read_mbps,
                                     args.decode_tokens))
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    print(f"{provenance()['hardware']} (AVX512-BF16: {'yes' if bf16 else 'no'}), float32, "
          f"{args.tokens}-token disk hit, reads capped at {args.read_mbps:g} MB/s")
    print("| tier.async_load | decode gap before (ms) | max gap during load (ms) | "
          "median gap during (ms) | decode tokens during | hit TTFT (s) | max / before |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {str(r['async_load']).lower()} | {r['gap_before_s'] * 1e3:.0f} | "
              f"{r['max_gap_during_s'] * 1e3:.0f} | {r['median_gap_during_s'] * 1e3:.0f} | "
              f"{r['tokens_during']} | {r['hit_ttft_s']:.2f} | {r['max_over_before']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
