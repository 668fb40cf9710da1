"""The cgroup socket hooks' kernel state: which process the `socks` map holds per socket cookie,
and which ports the `ports` map (listeners for their accepted sockets) holds, read back from the
loaded collector's maps after real socket calls.

The hooks do as little as possible per connection: sock_create skips TCP (connect or bind
records the process), connect/bind change an existing entry in place, and sock_release returns
at once for a TCP connection that outlives its descriptor. These tests hold the facts that must
survive those shortcuts.
"""

from __future__ import annotations

import os
import socket

import pytest

from ebpf import bpfsys, layout

SO_COOKIE = 57  # asm-generic/socket.h
SO_NETNS_COOKIE = 71
ORIGIN_SOCKET, ORIGIN_CONNECT, ORIGIN_BIND, ORIGIN_INHERITED = 1, 2, 3, 4
TCP, UDP = 6, 17


@pytest.fixture(scope="module")
def collector(loopback_collector):
    return loopback_collector


def cookie_of(sock: socket.socket) -> int:
    return layout.U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return layout.U64.unpack(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def sock_info(collector, sock: socket.socket) -> layout.SockInfo | None:
    raw = bpfsys.lookup(collector._socks_fd, layout.U64.pack(cookie_of(sock)),
                        layout.SOCK_INFO.size)
    return None if raw is None else layout.decode_sock_info(raw, 0)


def port_owner(collector, port: int, protocol: int) -> int | None:
    raw = bpfsys.lookup(collector._ports_fd, layout.PORT_KEY.pack(netns_cookie(), port, protocol),
                        8)
    return None if raw is None else layout.U64.unpack(raw)[0]


def assert_ours(info: layout.SockInfo | None, origin: int, protocol: int) -> None:
    assert info is not None, "no socks entry"
    assert info.origin == origin
    assert info.protocol == protocol
    assert info.netns == netns_cookie()
    assert info.process is not None and info.process.pid == os.getpid()


def test_udp_socket_is_recorded_at_creation_and_again_at_connect(needs_root, collector):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert_ours(sock_info(collector, sock), ORIGIN_SOCKET, UDP)
        sock.connect(("127.0.0.1", 9))
        assert_ours(sock_info(collector, sock), ORIGIN_CONNECT, UDP)
        cookie = cookie_of(sock)
    # Released: the entry goes with the socket.
    assert bpfsys.lookup(collector._socks_fd, layout.U64.pack(cookie), layout.SOCK_INFO.size) \
        is None


def test_bound_udp_socket_owns_its_port_until_released(needs_root, collector):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        info = sock_info(collector, sock)
        assert_ours(info, ORIGIN_BIND, UDP)
        assert info.bound_port == port
        assert port_owner(collector, port, UDP) == cookie_of(sock)
        sock.connect(("127.0.0.1", 9))  # a connected UDP socket still receives on its port
        assert port_owner(collector, port, UDP) == cookie_of(sock)
        assert_ours(sock_info(collector, sock), ORIGIN_CONNECT, UDP)
    assert port_owner(collector, port, UDP) is None


def test_tcp_connection_records_connecter_listener_and_accepted_socket(needs_root, collector):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert_ours(sock_info(collector, listener), ORIGIN_BIND, TCP)
        assert port_owner(collector, port, TCP) == cookie_of(listener)
        with socket.socket() as client:
            assert sock_info(collector, client) is None  # sock_create leaves TCP to connect
            client.connect(("127.0.0.1", port))
            accepted, _ = listener.accept()
            with accepted:
                assert_ours(sock_info(collector, client), ORIGIN_CONNECT, TCP)
                assert_ours(sock_info(collector, accepted), ORIGIN_INHERITED, TCP)
    # The listener's release (in LISTEN) removes its port.
    assert port_owner(collector, port, TCP) is None


def test_tcp_client_bound_before_connect_gives_up_its_port(needs_root, collector):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket() as client:
            client.bind(("127.0.0.1", 0))
            client_port = client.getsockname()[1]
            assert_ours(sock_info(collector, client), ORIGIN_BIND, TCP)
            assert port_owner(collector, client_port, TCP) == cookie_of(client)
            client.connect(listener.getsockname())
            info = sock_info(collector, client)
            assert_ours(info, ORIGIN_CONNECT, TCP)
            assert info.bound_port == client_port  # still its port for userspace attribution
            # A connecting socket is no listener: its port entry went at connect, so that its
            # release (ESTABLISHED, no map work) leaves nothing behind.
            assert port_owner(collector, client_port, TCP) is None
            listener.accept()[0].close()
        assert port_owner(collector, client_port, TCP) is None


def test_tcp_socket_closed_unconnected_leaves_no_entry(needs_root, collector):
    with socket.socket() as sock:
        assert sock_info(collector, sock) is None
        cookie = cookie_of(sock)
    assert bpfsys.lookup(collector._socks_fd, layout.U64.pack(cookie), layout.SOCK_INFO.size) \
        is None
