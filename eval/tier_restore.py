"""How close restoring a prompt's KV from the NVMe tier comes to the disk's own speed.

    .venv/bin/python eval/tier_restore.py --tokens 1024 2048 4096 --rounds 5

One server with the tier (``admission: always``) computes each prompt once and writes it
through. Then, per round and per length, alternating:

- **disk hit**: ``/flush_cache`` empties the device cache, the prompt comes back from disk
  (the same load path as after a restart, without the 50 s restart);
- **device hit**: the same prompt again, now cached on the device;
- **raw read**: ``dd iflag=direct bs=4M`` of exactly that prompt's chunk files, one after
  the other (what the disk alone takes to deliver the bytes).

It reports medians of the time to first token of both hits, the extra time of a disk hit
over a device hit, and that extra time divided by the raw read time: at 1.0 the tier adds
nothing to the disk's own time (below 1, its parallel reads beat one sequential ``dd``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serverlib import SERVER_BASE

from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

NEW_TOKENS = 4


def _raw_read(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct"],
                       check=True, capture_output=True)
    return time.perf_counter() - start


def _tier(server: Server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["tier"]


def _wait_written(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = _tier(server)
        if t["copies_pending"] == 0 and t["writes_in_flight"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the tier never finished writing")


def measure(folder: Path, lengths: list[int], rounds: int) -> list[dict]:
    tier = folder / "tier"
    config = folder / "kvtier.yaml"
    config.write_text(f"tier:\n  enabled: true\n  path: {tier}\n  admission: always\n")
    model = model_path("smollm2")
    tok = load_tokenizer(model)
    prompts = {n: token_prompt(tok, n, offset=70_000 + 10 * n) for n in lengths}
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model),
            *SERVER_BASE]
    times: dict[int, dict[str, list[float]]] = {n: {"disk": [], "device": [], "raw": []}
                                                for n in lengths}
    with Server(args, folder / "server.log") as server:
        files = {}
        for n, prompt in prompts.items():
            before = set(tier.rglob("*.kvc"))
            server.generate(prompt, NEW_TOKENS)
            _wait_written(server)
            files[n] = sorted(set(tier.rglob("*.kvc")) - before)
        for _ in tqdm(range(rounds), desc="rounds"):
            for n, prompt in prompts.items():
                server.flush_cache()
                disk = server.generate(prompt, NEW_TOKENS)
                assert disk.cached_details.get("storage") == n - 1, disk.cached_details
                device = server.generate(prompt, NEW_TOKENS)
                assert device.cached_details.get("device") == n - 1, device.cached_details
                times[n]["disk"].append(disk.ttft_s)
                times[n]["device"].append(device.ttft_s)
                times[n]["raw"].append(_raw_read(files[n]))
    rows = []
    for n in lengths:
        med = {k: statistics.median(v) for k, v in times[n].items()}
        extra = med["disk"] - med["device"]
        rows.append({"tokens": n, "chunk_files": len(files[n]), "disk_hit_s": med["disk"],
                     "device_hit_s": med["device"], "raw_read_s": med["raw"],
                     "extra_s": extra, "extra_over_raw": extra / med["raw"],
                     "disk_over_device": med["disk"] / med["device"], "rounds": rounds})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eval/tier_restore.py",
        description="Restore time from the NVMe tier against a device hit and against a raw "
                    "O_DIRECT read (dd) of the same chunk files, in one server and one run.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="prompt lengths to measure (default: 1024 2048 4096)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds per length; medians are reported (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvtier-restore-", dir="/var/tmp") as folder:
        rows = measure(Path(folder), args.tokens, args.rounds)
    print("| tokens | chunk files | device hit (s) | disk hit (s) | disk - device (s) | "
          "raw O_DIRECT read (s) | (disk - device) / raw | disk / device |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['chunk_files']} | {r['device_hit_s']:.3f} | "
              f"{r['disk_hit_s']:.3f} | {r['extra_s']:.3f} | {r['raw_read_s']:.3f} | "
              f"{r['extra_over_raw']:.2f} | {r['disk_over_device']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
