"""UDP and TCP senders: refusals counted and retried, TCP reconnects with templates first, the
backlog bounded and counted, IPv6 and source addresses."""

from __future__ import annotations

import socket
import time

import pytest

from bridge.addresses import parse_hostport
from bridge.errors import UserError
from bridge.tcp_transport import TcpTransport, UnacknowledgedWindow
from bridge.transport import open_transport

from .helpers import FakeClock


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    probe = socket.socket(socket.AF_INET, kind)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_udp_refusal_is_counted_and_retried_never_raised():
    port = free_port()
    transport = open_transport("udp", "127.0.0.1", port)
    results = [transport.send(b"x" * 50, 2) for _ in range(5)]
    assert transport.stats.refused >= 1  # ICMP port unreachable came back
    assert all(results)  # the retry after a refusal goes out
    assert transport.stats.messages_sent == 5
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", port))
    collector.settimeout(1)
    try:
        assert transport.send(b"hello", 1)
        assert collector.recv(100) == b"hello"
    finally:
        collector.close()
        transport.close()


def test_udp_one_socket_for_life_and_source_address():
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(1)
    transport = open_transport("udp", "127.0.0.1", collector.getsockname()[1], source="127.0.0.2")
    try:
        transport.send(b"a")
        transport.send(b"b")
        (_, first), (_, second) = collector.recvfrom(10), collector.recvfrom(10)
        assert first == second  # same source port: collectors key templates on it
        assert first[0] == "127.0.0.2"
    finally:
        collector.close()
        transport.close()


def test_udp_ipv6_collector():
    collector = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    collector.bind(("::1", 0))
    collector.settimeout(1)
    transport = open_transport("udp", "[::1]", collector.getsockname()[1])
    try:
        assert transport.label.startswith("udp://[::1]:")
        transport.send(b"six")
        data, sender = collector.recvfrom(10)
        assert data == b"six" and sender[0] == "::1"
    finally:
        collector.close()
        transport.close()


@pytest.mark.parametrize(
    ("kind", "host", "source", "message"),
    [
        ("udp", "127.0.0.1", "not-an-ip", "source address 'not-an-ip' is not an IP address"),
        ("udp", "127.0.0.1", "192.0.2.1", "cannot use source address '192.0.2.1'"),
        ("udp", "127.0.0.1", "::1", "no IPv6 address for '127.0.0.1'"),
        ("sctp", "127.0.0.1", None, "transport 'sctp': expected 'udp', 'tcp' or 'tls'"),
    ],
)
def test_bad_addresses_are_user_errors(kind, host, source, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        open_transport(kind, host, 4739, source=source)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4739", ("127.0.0.1", 4739)),
        ("[::1]:2055", ("::1", 2055)),
        ("collector.example:9995", ("collector.example", 9995)),
    ],
)
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:4739", "write an IPv6 address in brackets"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:0", "outside 1-65535"),
        ("127.0.0.1:http", "is not a number"),
        ("[::1]4739", r"expected \[IPv6-address\]:PORT"),
    ],
)
def test_parse_hostport_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_hostport(text, "--collector")


class Listener:
    def __init__(self, port: int = 0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.socket.listen()
        self.socket.settimeout(2)
        self.port = self.socket.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.socket.accept()
        conn.settimeout(2)
        return conn

    def close(self) -> None:
        self.socket.close()


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def tcp(port: int, clock: FakeClock, **options) -> TcpTransport:
    transport = open_transport("tcp", "127.0.0.1", port, clock=clock, backoff_initial=1, **options)
    templates = iter([b"T1", b"T2", b"T3"])
    transport.on_connect = lambda: [next(templates)]
    return transport


def test_tcp_collector_down_then_up_templates_first():
    clock = FakeClock()
    port = free_port(socket.SOCK_STREAM)
    transport = tcp(port, clock)
    assert transport.send(b"m1", 3)  # queued, not lost
    assert transport.stats.refused == 1 and transport.backlog_messages == 1
    listener = Listener(port)
    try:
        transport.flush()  # backoff not over yet: no new attempt
        assert transport.stats.refused == 1 and not transport.connected
        clock.advance(1)
        transport.flush(timeout=1)
        conn = listener.accept()
        assert read_exactly(conn, 4) == b"T1m1"
        assert transport.stats.connects == 1 and transport.backlog_messages == 0
    finally:
        transport.close()
        listener.close()


def test_tcp_reconnects_after_the_collector_closes_and_resends_templates():
    clock = FakeClock()
    listener = Listener()
    transport = tcp(listener.port, clock)
    try:
        transport.send(b"m1")
        transport.flush(timeout=1)
        first = listener.accept()
        assert read_exactly(first, 4) == b"T1m1"
        first.close()  # the collector restarts
        transport.flush(timeout=0.2)  # sees the EOF
        assert not transport.connected and transport.stats.send_errors == 1
        transport.send(b"m2", 1)
        clock.advance(1)
        transport.flush(timeout=1)
        second = listener.accept()
        assert read_exactly(second, 4) == b"T2m2"
        assert transport.stats.connects == 2
        assert transport.stats.messages_dropped == 0
    finally:
        transport.close()
        listener.close()


def test_tcp_message_written_into_a_dead_connection_is_sent_again():
    clock = FakeClock()
    listener = Listener()
    transport = tcp(listener.port, clock)
    try:
        transport.send(b"m1", 1)
        transport.flush(timeout=1)
        first = listener.accept()
        assert read_exactly(first, 4) == b"T1m1"
        first.close()  # the collector is killed before the agent looks at the connection
        assert transport.send(b"m2", 1) and transport.connected  # TCP takes it all the same
        time.sleep(0.1)  # the collector's kernel answers m2 with a reset, not an ACK
        transport.flush()
        assert not transport.connected
        assert transport.stats.messages_resent == 1 and transport.backlog_messages == 1
        clock.advance(1)
        transport.flush(timeout=1)
        second = listener.accept()
        # m1 was acknowledged: it is not sent twice; m2 was not: it follows the new templates.
        assert read_exactly(second, 4) == b"T2m2"
        assert transport.stats.messages_dropped == 0
    finally:
        transport.close()
        listener.close()


def test_unacknowledged_window_takes_back_every_message_in_the_unacknowledged_tail():
    window = UnacknowledgedWindow()
    for message in (b"a" * 10, b"b" * 10, b"c" * 10):
        window.add(message, 1)
    window.forget_acknowledged(25)  # 'a' reaches into the last 25 bytes: kept
    assert len(window) == 3
    window.forget_acknowledged(20)
    assert [m[:1] for m, _ in window.messages] == [b"b", b"c"]
    # TLS counts ciphertext: more unacknowledged bytes than the window holds takes it all.
    assert [m[:1] for m, _ in window.take_unacknowledged(1000)] == [b"b", b"c"]
    assert len(window) == 0 and window.bytes == 0
    window.add(b"d" * 10, 1)
    assert window.take_unacknowledged(0) == [] and window.bytes == 0
    window.add(b"e" * 10, 1)
    assert [m[:1] for m, _ in window.take_unacknowledged(1)] == [b"e"]


def test_tcp_backlog_is_bounded_oldest_dropped_and_counted():
    clock = FakeClock()
    transport = tcp(free_port(socket.SOCK_STREAM), clock, max_backlog_bytes=1000)
    for i in range(25):
        transport.send(bytes([i]) * 100, records=4)
    assert transport.backlog_messages == 10
    assert transport.stats.messages_dropped == 15
    assert transport.stats.records_dropped == 60
    assert transport.stats.bytes_dropped == 1500
    transport.close()
    assert transport.stats.messages_dropped == 25  # never sent at shutdown: counted too


def test_tcp_close_drains_the_backlog():
    clock = FakeClock()
    listener = Listener()
    transport = tcp(listener.port, clock)
    for i in range(100):
        transport.send(b"%03d" % i)
    transport.close(drain_seconds=2)
    conn = listener.accept()
    data = read_exactly(conn, 2 + 300)
    assert data == b"T1" + b"".join(b"%03d" % i for i in range(100))
    assert transport.stats.messages_dropped == 0
    listener.close()
