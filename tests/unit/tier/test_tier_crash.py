"""A writer killed with SIGKILL mid-stream leaves only whole, readable chunks behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from sgl_kvtier.tier import ChunkStore, ModelFingerprint, StoreConfig, chunk_keys, faults

FP = ModelFingerprint("crash-test", "float16", num_layers=8, num_kv_heads=4, head_dim=64)
CHUNK, CHUNKS = 128, 96
LAYOUT = FP.chunk_layout(CHUNK)  # 1 MiB per chunk


def payload(i: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(i).integers(0, 256, LAYOUT.nbytes, np.uint8))


_WRITER = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_tier_crash import CHUNK, CHUNKS, FP, LAYOUT, payload
    from sgl_kvtier.tier import ChunkStore, StoreConfig, chunk_keys

    store = ChunkStore(StoreConfig(sys.argv[1], 1 << 30, admission="always"))
    tokens = torch.arange(CHUNKS * CHUNK)
    keys = chunk_keys(FP, "", tokens, CHUNK)
    store.put(keys[0], tokens[:CHUNK], payload(0), LAYOUT)
    store.flush()
    print("started", flush=True)
    for i in range(1, CHUNKS):
        store.put(keys[i], tokens[i * CHUNK:(i + 1) * CHUNK], payload(i), LAYOUT)
    store.flush()
    print("finished", flush=True)
""")


def wait_for_a_write_in_flight(root, timeout=30.0) -> list:
    """Temporary files under ``root``: a chunk file is being written right now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.rglob("*.tmp"))
        if found:
            return found
        time.sleep(0.005)
    raise AssertionError("no write was ever in flight")


def test_kill_9_mid_write_leaves_only_whole_chunks(tmp_path):
    root = tmp_path / "tier"
    # Each 1 MiB chunk file is written in 4 MiB blocks after a pause: slow the pause, so a
    # write is surely under way (a temporary file exists) when the kill lands.
    env = {**os.environ, faults.ENV: "block:delay=0.05"}
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), os.path.dirname(__file__)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "started"
    in_flight = wait_for_a_write_in_flight(root)
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list(root.rglob("*.tmp"))
    assert in_flight and leftovers, "the kill did not land during a write"

    with ChunkStore(StoreConfig(root, 1 << 30, admission="always")) as store:
        assert not list(root.rglob("*.tmp"))
        assert store.stats()["corrupt_files"] == 0
        tokens = torch.arange(CHUNKS * CHUNK)
        keys = chunk_keys(FP, "", tokens, CHUNK)
        present = [i for i, key in enumerate(keys) if key in store._index]
        assert present and present[0] == 0
        loaded = store.load([keys[i] for i in present],
                            [tokens[i * CHUNK:(i + 1) * CHUNK] for i in present], LAYOUT)
        for i, got in zip(present, loaded):
            assert torch.equal(got, payload(i))
        assert store.stats()["temp_files_removed"] == len(leftovers)
