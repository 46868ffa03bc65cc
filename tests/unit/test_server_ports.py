"""A server's port is picked outside the kernel's ephemeral range, a port taken before the
launch is replaced, and one taken between the launch and the server's bind means a new
launch on a new port, not a health check that never answers."""

import socket
import sys
from pathlib import Path

import requests

from sgl_kvtier.harness.server import Server, _ephemeral_low, free_port, port_is_free

STAND_IN = [sys.executable, str(Path(__file__).with_name("health_server.py"))]


def test_ports_come_from_below_the_ephemeral_range():
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < min(22000, _ephemeral_low()) for p in ports)
    assert len(ports) > 1  # picked at random: two harnesses starting together rarely meet


def test_a_taken_port_is_replaced_before_launch(tmp_path):
    server = Server([], tmp_path / "server.log")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        assert not port_is_free(server.port)
        before = server.port
        server._claim_port()
        assert server.port != before and port_is_free(server.port)
        assert server.url == f"http://127.0.0.1:{server.port}"


def test_a_port_taken_while_the_server_starts_means_a_new_launch(tmp_path, monkeypatch):
    server = Server(["--bind-delay", "1.0"], tmp_path / "server.log", launcher=STAND_IN,
                    startup_timeout=30)
    launches, held = [], socket.socket()
    real_launch = Server._launch

    def launch_then_take_the_port(self, append):
        real_launch(self, append)
        launches.append(self.port)
        if len(launches) == 1:  # the stand-in binds 1 s from now: take its port first
            held.bind(("127.0.0.1", self.port))
            held.listen()

    monkeypatch.setattr(Server, "_launch", launch_then_take_the_port)
    try:
        with server:
            assert len(launches) == 2 and server.port == launches[1] != launches[0]
            assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        log = server.log_path.read_text()
        assert f"('127.0.0.1', {launches[0]}): address already in use" in log
        assert f"port {launches[0]} was taken at bind time; launching again on " \
               f"{launches[1]}" in log
    finally:
        held.close()
