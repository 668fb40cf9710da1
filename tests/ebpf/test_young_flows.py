"""A TCP flow is reported live only once it is MIN_LIVE_AGE_NS old (most connections end
sooner and are reported once, finalised by the kernel); the agent's last poll reports it at once."""

from __future__ import annotations

import os
import socket
import time

from ebpf.collector import MIN_LIVE_AGE_NS
from ebpf.observation import EndCause, FlowObservation

PORT = 47531


def _connection(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    client.sendall(b"x" * 100)
    assert accepted.recv(100) == b"x" * 100
    return server, client, accepted


def _mine(observations: list[FlowObservation], port: int) -> list[FlowObservation]:
    return [o for o in observations if port in (o.key.src_port, o.key.dst_port)]


def test_young_tcp_flow_waits_then_is_reported_live(needs_root, loopback_collector):
    loopback_collector.poll(0)
    opened_ns = time.monotonic_ns()
    sockets = _connection(PORT)
    try:
        seen: list[FlowObservation] = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            seen = _mine(loopback_collector.poll(20), PORT)
            returned_ns = time.monotonic_ns()
            # Every packet of the connection came after opened_ns, and the poll reads its clock
            # before it returns: one that returns less than the age after it must not report it.
            assert not seen or returned_ns - opened_ns >= MIN_LIVE_AGE_NS, seen
        assert len(seen) == 4, seen  # both directions of the client's and the server's socket
        for obs in seen:
            assert obs.end == EndCause.NONE
            assert obs.process is not None and obs.process.pid == os.getpid()
        client_out = [o for o in seen if o.key.dst_port == PORT and o.key.direction == 1]
        # SYN, ACK, the 100 bytes: all counted although the first poll passed the flow by.
        assert client_out[0].tcp_flags & 0x02 and client_out[0].packets >= 3
        assert client_out[0].octets >= 100 + 3 * 40
    finally:
        for sock in sockets:
            sock.close()


def test_final_poll_reports_a_young_flow_at_once(needs_root, loopback_collector):
    loopback_collector.poll(0)
    sockets = _connection(PORT + 1)
    try:
        observations = _mine(loopback_collector.poll(0, final=True), PORT + 1)
        assert len(observations) == 4, observations
        assert all(o.end == EndCause.NONE and o.packets >= 1 for o in observations)
    finally:
        for sock in sockets:
            sock.close()
