"""TCP connections the kernel finalises itself (EV_FLOW_FINAL, ebpf/flows.bpf.c track_end).

The counting programs see both FINs and their ACKs (or the RST), send one ring record with both
directions' final counters and the sending process, and delete the entries: the collector then
does no map operation and keeps no state for the connection. Checked against a capture on lo
(real kernel, root) and, for the collector's handling of the records, on synthetic records."""

from __future__ import annotations

import os
import socket

import pytest

from ebpf import bpfsys, layout
from ebpf.attribution import Attribution
from ebpf.endings import Endings
from ebpf.flow_ends import FlowEnds
from ebpf.layout import SockInfo
from ebpf.observation import Direction, EndCause, FlowKey, ProcessInfo
from tests.ebpf.test_loader import (  # the capture and polling helpers of the loader tests
    LoCapture,
    all_ended,
    collect,
    collector,  # noqa: F401 - the module's collector fixture
    differences,
    host_netns,
    keys_both_ways,
    my_comm,
    tcp_exchange,
)

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


@pytest.mark.parametrize(
    "server_family,server_host,client_host,port,client_first",
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", 47901, True),
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", 47902, False),
        (socket.AF_INET6, "::1", "::1", 47903, False),
        # A dual-stack server: its accepted socket is IPv6 with IPv4-mapped addresses.
        (socket.AF_INET6, "::", "127.0.0.1", 47904, False),
    ],
)
def test_ended_connection_is_final_without_map_operations(
        needs_root, collector, tmp_path, server_family, server_host,  # noqa: F811
        client_host, port, client_first):
    taken = []
    lookup_and_delete = collector._elems.lookup_and_delete

    def counting(kraw: bytes):
        taken.append(kraw)
        return lookup_and_delete(kraw)

    collector._elems.lookup_and_delete = counting
    try:
        cap = LoCapture(tmp_path / "final.pcap", f"tcp port {port}")
        client_port, _ = tcp_exchange(server_family, server_host, port, 3000, 200, client_first,
                                      connect_to=client_host)
        truth = cap.stop()
        expected = keys_both_ways(host_netns(), truth)
        assert len(expected) == 4, f"capture saw {list(truth)}"
        observed = collect(collector, all_ended(expected))
    finally:
        collector._elems.lookup_and_delete = lookup_and_delete
    assert differences(observed, expected) == []
    me, comm = os.getpid(), my_comm()
    for key in expected:
        obs = observed[key]
        assert obs.end == EndCause.FIN, key
        assert obs.process is not None and (obs.process.pid, obs.process.comm) == (me, comm)
        client_side = (key.src_port if key.direction == Direction.EGRESS
                       else key.dst_port) == client_port
        assert obs.local_initiated is client_side, key
        assert obs.tcp is not None and obs.tcp.srtt_us > 0
    # The kernel deleted the entries; the collector took none and keeps nothing of them.
    ns_cookie = next(state.cookie for state in collector._attacher.namespaces.values()
                     if state.ns.inode == host_netns())
    kraws = [layout.encode_key(key, ns_cookie) for key in expected]
    assert [k for k in kraws if k in taken] == []
    assert [k for k in kraws if bpfsys.lookup(collector._flows_fd, k, layout.FLOW_VAL.size)
            is not None] == []
    assert [k for k in kraws if k in collector._reported] == []
    conns = {layout.conn_of(layout.key_parts(k)) for k in kraws}
    assert conns.isdisjoint(collector._endings.closing)


# -- the collector's handling of final records, on synthetic records (no root) -----------------

NETNS_COOKIE, NETNS_INODE = 77, 4026531999
LOOPBACK = bytes([127, 0, 0, 1])


class Namespaces:
    cookie_to_inode = {NETNS_COOKIE: NETNS_INODE}


class Finals(FlowEnds):
    """The state FlowEnds._finals works on, without a kernel."""

    def __init__(self) -> None:
        self._offset_ns = 0
        self._reported = {}
        self._endings = Endings()
        self._attacher = Namespaces()
        self._attr = Attribution(None, scoped=False)  # type: ignore[arg-type]
        self._retired_keys: set[bytes] = set()
        self._final_keys: set[bytes] = set()
        self._deferred_finals: list = []


def value(packets: int, flags: int, egress: bool, origin: int = 2) -> list:
    fields = dict.fromkeys(layout.FlowValue._fields, 0)
    fields.update(octets=packets * 60, packets=packets, first_ns=5_000_000, last_ns=9_000_000,
                  tcp_flags=flags, ifindex=1, comm=bytes(16))
    if egress:
        fields.update(cookie=4321, srtt_us=40, min_rtt_us=30, snd_cwnd=10, state=7, tgid=555,
                      uid=1000, origin=origin, comm=b"client".ljust(16, b"\0"))
    return list(fields.values())


def final_record(client_port: int, origin: int = 2) -> bytes:
    """The client's side of a connection to :80, ended by its last ACK (egress key)."""
    return layout.FINAL.pack(
        layout.EV_FLOW_FINAL, 1, NETNS_COOKIE, LOOPBACK, LOOPBACK, client_port, 80, 6, 4,
        Direction.EGRESS, *value(6, TCP_SYN | TCP_ACK | TCP_FIN, True, origin),
        *value(5, TCP_SYN | TCP_ACK | TCP_FIN, False),
    )


def test_a_final_record_gives_both_directions_with_process_and_health():
    finals = Finals()
    out: list = []
    finals._finals([final_record(40001)], out, {})
    by_direction = {obs.key.direction: obs for obs in out}
    sent, received = by_direction[Direction.EGRESS], by_direction[Direction.INGRESS]
    assert sent.key == FlowKey(NETNS_INODE, Direction.EGRESS, 4, 6, LOOPBACK, LOOPBACK, 40001, 80)
    assert received.key == FlowKey(NETNS_INODE, Direction.INGRESS, 4, 6, LOOPBACK, LOOPBACK, 80,
                                   40001)
    assert (sent.packets, sent.octets, received.packets, received.octets) == (6, 360, 5, 300)
    for obs in out:
        assert obs.end == EndCause.FIN
        assert (obs.first_ms, obs.last_ms) == (5, 9)
        assert obs.process is not None and (obs.process.pid, obs.process.comm) == (555, "client")
        assert obs.local_initiated is True and obs.socket_cookie == 4321
        assert obs.tcp is not None and (obs.tcp.srtt_us, obs.tcp.snd_cwnd) == (40, 10)


def test_a_key_finalised_twice_in_one_poll_waits_for_the_next():
    """A client port reused within one poll: the agent's cache would merge two ends of one key
    in one batch, so the second connection's records come with the next poll."""
    finals = Finals()
    out: list = []
    finals._finals([final_record(40002), final_record(40002)], out, {})
    assert len(out) == 2 and len({obs.key for obs in out}) == 2
    finals._final_keys.clear()  # the next poll
    later = finals._take_deferred_finals()
    assert {obs.key for obs in later} == {obs.key for obs in out}
    assert finals._deferred_finals == []


def test_a_socket_the_kernel_has_no_process_for_is_attributed_by_the_agent():
    """origin 0: a connection older than the agent; the start-up scan's facts apply."""
    finals = Finals()
    conn = (NETNS_COOKIE, 6, 4, LOOPBACK, 40003, LOOPBACK, 80)
    scanned = ProcessInfo(777, "older", 0, 0)
    finals._attr.remember(4321, SockInfo(NETNS_COOKIE, scanned, 0, 6, 6))  # scan: accepted
    finals._attr._link(conn, 4321)
    out: list = []
    finals._finals([final_record(40003, origin=0)], out, {})
    assert len(out) == 2
    for obs in out:
        assert obs.socket_cookie == 4321 and obs.process is scanned
        assert obs.local_initiated is False
    assert finals._attr.conns_of_cookie(4321) == set()  # nothing kept after the end


def server_side_record(client_port: int, flags_in: int, flags_out: int,
                       has_reverse: bool = True, origin: int = 4) -> bytes:
    """The server's side of a connection from :client_port to :80, ended by a packet arriving
    (ingress key client -> server): the sending process is in the other direction's value."""
    other = value(5, flags_out, True, origin) if has_reverse else [0] * 22 + [bytes(16)]
    return layout.FINAL.pack(
        layout.EV_FLOW_FINAL, int(has_reverse), NETNS_COOKIE, LOOPBACK, LOOPBACK, client_port, 80,
        6, 4, Direction.INGRESS, *value(6, flags_in, False), *other,
    )


def test_an_ingress_keyed_record_takes_the_socket_from_the_other_direction():
    finals = Finals()
    out: list = []
    finals._finals([server_side_record(40004, TCP_SYN | TCP_ACK | TCP_RST, TCP_SYN | TCP_ACK)],
                   out, {})
    by_direction = {obs.key.direction: obs for obs in out}
    received, sent = by_direction[Direction.INGRESS], by_direction[Direction.EGRESS]
    assert received.key == FlowKey(NETNS_INODE, Direction.INGRESS, 4, 6, LOOPBACK, LOOPBACK,
                                   40004, 80)
    assert sent.key == FlowKey(NETNS_INODE, Direction.EGRESS, 4, 6, LOOPBACK, LOOPBACK, 80, 40004)
    assert (received.packets, received.tcp_flags, sent.packets, sent.tcp_flags) == (
        6, TCP_SYN | TCP_ACK | TCP_RST, 5, TCP_SYN | TCP_ACK)
    for obs in out:
        assert obs.end == EndCause.RST_RECEIVED  # the RST came in: the peer reset
        assert obs.process is not None and (obs.process.pid, obs.process.comm) == (555, "client")
        assert obs.local_initiated is False and obs.socket_cookie == 4321
        assert obs.tcp is not None and obs.tcp.srtt_us == 40


def test_a_record_without_the_egress_direction_is_attributed_by_the_agent():
    """Only the ingress direction in the record: no socket facts from the kernel, the agent's
    own (here: a listener on the local port) apply, and one observation comes out."""
    finals = Finals()
    listener = ProcessInfo(80, "server", 0, 0)
    finals._attr.remember(999, SockInfo(NETNS_COOKIE, listener, 80, 6, 3))
    out: list = []
    finals._finals([server_side_record(40005, TCP_SYN | TCP_ACK | TCP_FIN, 0, has_reverse=False)],
                   out, {})
    assert len(out) == 1
    obs = out[0]
    assert obs.key.direction == Direction.INGRESS and obs.end == EndCause.FIN
    assert obs.process is listener and obs.local_initiated is False
    assert obs.socket_cookie == 0 and obs.tcp is None


def test_an_ipv6_record_keeps_its_addresses_whole():
    local, remote = bytes(15) + b"\x01", bytes.fromhex("20010db8" + "00" * 11 + "07")
    record = layout.FINAL.pack(
        layout.EV_FLOW_FINAL, 1, NETNS_COOKIE, local, remote, 40006, 443, 6, 6,
        Direction.EGRESS, *value(3, TCP_FIN | TCP_ACK, True), *value(2, TCP_FIN | TCP_ACK, False))
    finals = Finals()
    out: list = []
    finals._finals([record], out, {})
    keys = {obs.key for obs in out}
    assert keys == {
        FlowKey(NETNS_INODE, Direction.EGRESS, 6, 6, local, remote, 40006, 443),
        FlowKey(NETNS_INODE, Direction.INGRESS, 6, 6, remote, local, 443, 40006),
    }

