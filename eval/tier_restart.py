"""Restart time of an SGLang server whose NVMe tier holds many gigabytes.

    .venv/bin/python eval/tier_restart.py --gigabytes 10

Fills a tier directory with that many bytes of valid chunk files (random KV in the
embedded model's layout: float32, 256-token chunks of 11.8 MB), then starts the server
with ``--enable-kvtier`` on that tier and on an empty one, alternately, and reports the
time from launch to a healthy server and the tier's own index rebuild time (from
``/get_server_info``). The chunks are synthetic: what is measured is start-up, which reads
only the 4 KiB header of each file.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serverlib import SERVER_BASE

from sgl_kvtier.harness.models import model_path
from sgl_kvtier.harness.server import Server
from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig, chunk_keys


def fill(root: Path, gigabytes: float) -> int:
    """Write chunk files until ``gigabytes`` of them exist under ``root``; returns count."""
    fp = ModelFingerprint("restart-bench", "float32", 30, 3, 64)
    layout = fp.chunk_layout(256)
    count = int(gigabytes * 1e9 // layout.nbytes)
    tokens = torch.randint(0, 49_000, (count * 256,))
    keys = chunk_keys(fp, "", tokens, 256)
    payload = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)
    config = StoreConfig(root, 1 << 50, admission="always", max_queued_write_bytes=1 << 30)
    with ChunkStore(config) as store:
        for i, key in enumerate(tqdm(keys, desc="writing chunks", unit="chunk")):
            chunk = payload.clone()
            chunk[:8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)
            while not store.put(key, tokens[i * 256:(i + 1) * 256], chunk, layout):
                store.flush()  # the write queue is full: let it drain
        store.flush()
        return store.stats()["chunks"]


def start_seconds(tier_dir: Path, logs: Path, label: str) -> tuple[float, dict]:
    config = logs / f"{label}.yaml"
    config.write_text(f"tier:\n  enabled: true\n  path: {tier_dir}\n  capacity: 1TB\n")
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path",
            str(model_path("smollm2")), *SERVER_BASE]
    server = Server(args, logs / f"{label}.log")
    start = time.perf_counter()
    with server:
        seconds = time.perf_counter() - start
        state = server.server_info()["internal_states"][0]["kvtier"]["tier"]
    return seconds, state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=10.0,
                        help="bytes of chunk files in the full tier (default: 10)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the tiers go, on the disk to measure (default: a new "
                             "folder under /var/tmp, deleted afterwards)")
    parser.add_argument("--rounds", type=int, default=2, help="starts of each server")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="kvtier-restart-", dir="/var/tmp"))
    try:
        full, empty = base / "full", base / "empty"
        chunks = fill(full / "tp0-of-1", args.gigabytes)
        empty.mkdir(parents=True, exist_ok=True)
        times = {"full": [], "empty": []}
        rebuild = []
        for r in range(args.rounds):
            for label, tier_dir in (("full", full), ("empty", empty)):
                seconds, state = start_seconds(tier_dir, base, f"{label}-{r}")
                times[label].append(seconds)
                if label == "full":
                    assert state["chunks"] == chunks, state
                    rebuild.append(state["rebuild_seconds"])
        print(f"tier: {chunks} chunks, {chunks * 11_796_480 / 1e9:.2f} GB under {full}")
        print("| server | starts (s) | median (s) |\n|---|---|---:|")
        for label, values in times.items():
            print(f"| {label} tier | {', '.join(f'{v:.1f}' for v in values)} | "
                  f"{statistics.median(values):.1f} |")
        print(f"index rebuild inside the full server: "
              f"{', '.join(f'{v:.3f}' for v in rebuild)} s")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
