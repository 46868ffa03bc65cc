"""Helpers of the NVMe tier's server tests: servers with a tier config, their counters,
their log, and a chunk-by-chunk comparison of two tier folders."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from serverlib import SERVER_BASE

from sgl_kvtier.harness.server import Server
from sgl_kvtier.tier import faults
from sgl_kvtier.tier.chunk_file import HEADER_SIZE, unpack_header

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

    def start(self, yaml_text: str, extra=(), rlimits=None, faults_spec: str = "") -> Server:
        self.count += 1
        config = self.folder / f"kvtier-{self.count}.yaml"
        config.write_text(yaml_text)
        args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path",
                str(self.model_dir), *SERVER_BASE, *extra]
        env = {**self.env, faults.ENV: faults_spec} if faults_spec else self.env
        server = Server(args, self.folder / f"server-{self.count}.log", env=env,
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


def tier(server: Server) -> dict:
    return server.server_info()["internal_states"][0]["kvtier"]["tier"]


def scheduler_pid(server: Server) -> int:
    return server.server_info()["internal_states"][0]["kvtier"]["scheduler_pid"]


def wait_idle(server: Server, chunks: int = 0, timeout: float = 180) -> dict:
    """Wait until the tier holds ``chunks`` chunks and no copy or write is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = tier(server)
        if (state["chunks"] >= chunks and state["copies_pending"] == 0
                and state["writes_in_flight"] == 0):
            return state
        time.sleep(0.2)
    raise AssertionError(f"tier holds {state['chunks']} chunks, expected {chunks}: {state}")


def log_lines(server: Server, fragment: str) -> list[str]:
    return [line for line in server.log_path.read_text().splitlines() if fragment in line]


def chunk_payload(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header = unpack_header(data[:HEADER_SIZE])
    payload = np.frombuffer(data[HEADER_SIZE:HEADER_SIZE + header.payload_len], np.uint8)
    return payload.view(header.layout.dtype)


def compare_chunks(folder: Path, reference: Path) -> int:
    """Assert every chunk file under ``folder`` holds the KV the reference server
    computed for the same key (same name); returns how many were compared."""
    theirs = {p.name: p for p in reference.rglob("*.kvc")}
    compared = 0
    for path in sorted(folder.rglob("*.kvc")):
        assert path.name in theirs, f"{path.name}: a chunk the reference never wrote"
        got, want = chunk_payload(path), chunk_payload(theirs[path.name])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3,
                                   err_msg=f"{path.name} holds other KV than its tokens'")
        compared += 1
    return compared
