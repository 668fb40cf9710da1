"""Pre-existing TCP sockets (found by the start-up scan) are reported when destroyed: the
agent puts their cookies into `watched`, and the tcp_destroy_sock tracepoint, which every TCP
socket of the machine runs, sends their end and deletes the entry. The tracepoint skips every
cookie above `watched_ceiling` (a cold `watched` lookup per socket cost ~350 ns), so the agent
must raise the ceiling to cover each cookie it watches. These tests hold that: every watched
cookie is under the ceiling across scans, and a watched socket's destruction reaches the
tracepoint (its entry goes)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from ebpf import bpfsys, layout
from tests.ebpf.conftest import open_collector

pytestmark = pytest.mark.root

SO_COOKIE = 57  # asm-generic/socket.h


def cookie_of(sock: socket.socket) -> int:
    return layout.U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def connected_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return client, accepted


def abort(sock: socket.socket) -> None:
    """Close with a RST: the socket is destroyed at once (no FIN_WAIT, no TIME_WAIT)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture(scope="module")
def existing() -> Iterator[list[socket.socket]]:
    """Two established connections opened before the collector; four sockets."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sockets = [*connected_pair(listener), *connected_pair(listener)]
    yield sockets
    for sock in sockets:
        sock.close()


@pytest.fixture(scope="module")
def collector(existing: list[socket.socket]) -> Iterator[object]:
    source = open_collector()
    try:
        yield source
    finally:
        source.close()


def watched_cookies(collector) -> set[int]:
    cookies: set[int] = set()
    for keys, _ in bpfsys.BatchReader(collector._watched_fd, 8, 8).read():
        cookies.update(cookie for (cookie,) in layout.U64.iter_unpack(keys))
    return cookies


def ceiling(collector) -> int:
    fd = collector._loaded.table_fd("watched_ceiling")
    raw = bpfsys.lookup(fd, layout.U32.pack(0), 8)
    assert raw is not None
    return layout.U64.unpack(raw)[0]


def wait_unwatched(collector, cookie: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cookie not in watched_cookies(collector):
            return True
        time.sleep(0.05)
    return False


def test_every_watched_cookie_is_under_the_ceiling(needs_root, collector, existing):
    cookies = {cookie_of(sock) for sock in existing}
    watched = watched_cookies(collector)
    assert cookies <= watched, "the scan did not watch the pre-existing connections"
    assert max(watched) <= ceiling(collector)
    before = ceiling(collector)
    collector.scan_existing()  # a later scan (new namespaces) never lowers it
    assert ceiling(collector) >= before
    assert max(watched_cookies(collector)) <= ceiling(collector)


def test_destroyed_watched_socket_reaches_the_tracepoint(needs_root, collector, existing):
    client, accepted = existing[2], existing[3]
    cookies = (cookie_of(client), cookie_of(accepted))
    assert set(cookies) <= watched_cookies(collector)
    abort(client)
    assert wait_unwatched(collector, cookies[0]), "tcp_destroy_sock skipped a watched socket"
    abort(accepted)  # answered the RST already: destroyed on close
    assert wait_unwatched(collector, cookies[1]), "tcp_destroy_sock skipped a watched socket"
