"""What the collector keeps per kernel flow key and per socket (the agent's memory at scale,
bench.scale): only the counters later polls need, one object per shared key part, one
connection per socket without a set. The state kept must still give exact counts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

from ebpf import layout
from ebpf.attribution import Attribution
from ebpf.observation import Direction
from tests.ebpf.test_loader import collect

LOOPBACK = bytes([127, 0, 0, 1])
PEER = bytes([10, 0, 0, 9])


def test_release_reports_what_was_counted_after_the_last_poll(needs_root, loopback_collector):
    """The collector keeps the last read's counters, not the whole value: the remainder of a
    flow released between polls is exactly the packets counted since that read."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 47511))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"a" * 10, ("127.0.0.1", 47511))

    def mine(seen):
        return [k for k in seen if k.dst_port == 47511 and k.direction == Direction.EGRESS]

    observed = collect(loopback_collector, lambda seen: bool(mine(seen)))
    key = mine(observed)[0]
    first = observed[key]
    assert (first.packets, first.octets) == (1, 10 + 28)
    # Loopback egress is counted in the sending call: both are in the map before the release.
    sender.sendto(b"b" * 20, ("127.0.0.1", 47511))
    sender.sendto(b"c" * 30, ("127.0.0.1", 47511))
    loopback_collector.release([key])
    rest = [obs for obs in loopback_collector.poll(0) if obs.key == key]
    assert [(obs.packets, obs.octets) for obs in rest] == [(2, 20 + 30 + 2 * 28)]
    assert rest[0].first_ms >= first.last_ms and rest[0].last_ms >= rest[0].first_ms
    assert rest[0].process is not None and rest[0].process.pid > 0
    sender.close()
    sink.close()


def test_key_parts_are_shared_between_keys():
    """Both directions of a connection, and every connection of a host, hold one object per
    address, port and namespace cookie (one per key part cost ~200 bytes a flow)."""
    netns = 4026531840 + 12345
    egress = layout.FLOW_KEY.pack(netns, LOOPBACK, PEER, 40001, 443, 6, 4, Direction.EGRESS)
    ingress = layout.FLOW_KEY.pack(netns, PEER, LOOPBACK, 443, 40001, 6, 4, Direction.INGRESS)
    sent, received = layout.key_parts(egress), layout.key_parts(ingress)
    assert sent == (netns, LOOPBACK, PEER, 40001, 443, 6, 4, 1)
    assert received == (netns, PEER, LOOPBACK, 443, 40001, 6, 4, 0)
    assert sent[0] is received[0]
    assert sent[1] is received[2] and sent[2] is received[1]
    assert sent[3] is received[4] and sent[4] is received[3]
    assert layout.conn_of(sent) == layout.conn_of(received)
    # The FlowKey built from the connection is the key's own (ICMP: its type and code too).
    ping = layout.FLOW_KEY.pack(netns, LOOPBACK, PEER, 0, 8 << 8, 1, 4, Direction.EGRESS)
    for kraw in (egress, ingress, ping):
        parts = layout.key_parts(kraw)
        built = layout.key_of_conn(layout.conn_of(parts), parts[7], 99, kraw)
        assert built == layout.flow_key(parts, 99)


class NoSockets:
    """The kernel's socket map, empty."""

    def read(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(())


def test_a_socket_holds_one_connection_or_a_set_of_them():
    attr = Attribution(NoSockets(), scoped=False)  # type: ignore[arg-type]
    tcp = (7, 6, 4, LOOPBACK, 40001, PEER, 443)
    attr._link(tcp, 11)
    attr._link(tcp, 11)
    assert attr.conns_of_cookie(11) == {tcp}
    # An unconnected UDP socket talks to many peers.
    udp = [(7, 17, 4, LOOPBACK, 5353, PEER, port) for port in (1000, 1001, 1002)]
    for conn in udp:
        attr._link(conn, 22)
    assert attr.conns_of_cookie(22) == set(udp)
    attr.forget_conn(udp[0])
    assert attr.conns_of_cookie(22) == set(udp[1:])
    # A connection that moves to another socket leaves the first one.
    attr._link(tcp, 33)
    assert attr.conns_of_cookie(11) == set() and attr.conns_of_cookie(33) == {tcp}
    assert attr.resolve(tcp, 0)[0] == 33
    attr.forget_cookie(22)
    assert attr.conns_of_cookie(22) == set()
    assert [attr.resolve(conn, 0)[0] for conn in udp] == [0, 0, 0]
    attr.forget_conn(tcp)
    assert attr.conns_of_cookie(33) == set() and attr.resolve(tcp, 0)[0] == 0
