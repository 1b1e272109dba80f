"""The network guard of tests/conftest.py: loopback only, refused before any packet leaves."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import NetworkBlocked, allowed_address


def test_a_connection_beyond_loopback_is_refused_before_it_is_attempted():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(NetworkBlocked, match="192.0.2.1"):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routable, so only the guard can answer at once
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("192.0.2.1", 443), timeout=5)


def test_loopback_connects_for_real():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            peer, _ = server.accept()
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
            peer.close()


@pytest.mark.parametrize(("address", "allowed"), [
    (("127.0.0.1", 80), True), (("127.8.9.10", 1), True), (("::1", 80, 0, 0), True), (("localhost", 80), True),
    ("/tmp/some.sock", True), (("10.0.0.1", 80), False), (("::ffff:8.8.8.8", 53, 0, 0), False),
    (("example.org", 80), False), (("es.internal", 9200), False)])
def test_which_addresses_may_be_reached(address, allowed):
    assert allowed_address(address) is allowed


def test_a_live_server_named_by_its_variable_may_be_reached():
    assert allowed_address(("es.internal", 9200), {"es.internal"})
