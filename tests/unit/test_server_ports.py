"""A port taken between picking it and starting the server is replaced, not fought over."""

import socket

from sgl_kvtier.harness.server import Server, port_is_free


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
