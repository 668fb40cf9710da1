"""TCP on lo: one kernel entry per packet direction, read as both sockets' flows (ebpf/loopback.py).

The counting program counts a loopback TCP packet into its EGRESS entry only, finalises a
connection with one record carrying both sockets, and the collector expands entries and records
into the EGRESS and INGRESS flow of each local socket. Checked against the real kernel's map and
ring records and a capture on lo, with the two sockets in two processes; the collector's
handling of the records also on synthetic records."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from ebpf import bpfsys, layout
from ebpf.layout import SockInfo
from ebpf.loopback import LoopbackEnds
from ebpf.observation import Direction, EndCause, FlowKey, ProcessInfo
from tests.ebpf.test_kernel_finals import NETNS_COOKIE, NETNS_INODE, Finals, value
from tests.ebpf.test_loader import (  # the capture and polling helpers of the loader tests
    LoCapture,
    all_ended,
    collect,
    collector,  # noqa: F401 - the module's collector fixture
    differences,
    host_netns,
    keys_both_ways,
)

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
LOCALHOST = bytes([127, 0, 0, 1])

# The client of ChildClient: connects, sends `up` bytes, reads `down`, closes when told.
CLIENT = """
import socket, sys
port, up, down = map(int, sys.argv[1:4])
client = socket.create_connection(("127.0.0.1", port))
print(client.getsockname()[1], flush=True)
client.sendall(b"u" * up)
got = 0
while got < down:
    got += len(client.recv(1 << 16))
sys.stdin.readline()
client.close()
"""


class ChildClient:
    """A TCP connection on lo whose client lives in a process of its own and whose server is
    this process: the two sockets have two processes."""

    def __init__(self, port: int, up: int, down: int) -> None:
        self.port = port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen()
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(up), str(down)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.accepted, _ = self.server.accept()
        assert self.proc.stdout is not None
        self.client_port = int(self.proc.stdout.readline())
        with open(f"/proc/{self.proc.pid}/comm") as f:
            self.comm = f.read().strip()
        received = 0
        while received < up:
            received += len(self.accepted.recv(1 << 16))
        self.accepted.sendall(b"d" * down)

    def close(self) -> None:
        """The client closes first, then the server."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
            time.sleep(0.05)
        self.accepted.close()
        self.server.close()

    def key(self, direction: Direction, from_client: bool) -> FlowKey:
        ports = (self.client_port, self.port) if from_client else (self.port, self.client_port)
        return FlowKey(host_netns(), direction, 4, 6, LOCALHOST, LOCALHOST, *ports)

    def local_port(self, key: FlowKey) -> int:
        return key.src_port if key.direction == Direction.EGRESS else key.dst_port


def kernel_entries(collector, ports: set[int], protocol: int) -> dict[tuple, layout.FlowValue]:  # noqa: F811
    """(direction, source port, destination port) -> value of every kernel flow entry between
    the two ports."""
    out = {}
    size, value_size = layout.FLOW_KEY.size, layout.FLOW_VAL.size
    for keys, values in collector._reader.read():
        for i in range(len(keys) // size):
            _, _, _, sport, dport, proto, _, direction = layout.FLOW_KEY.unpack_from(keys, i * size)
            if proto == protocol and {sport, dport} == ports:
                out[(direction, sport, dport)] = layout.decode_value(values, i * value_size)
    return out


def test_one_kernel_entry_per_loopback_tcp_direction(needs_root, collector):  # noqa: F811
    conn = ChildClient(47951, 3000, 200)
    try:
        entries = kernel_entries(collector, {conn.client_port, conn.port}, 6)
    finally:
        conn.close()
    assert set(entries) == {(Direction.EGRESS, conn.client_port, conn.port),
                            (Direction.EGRESS, conn.port, conn.client_port)}
    sent, answered = (entries[(Direction.EGRESS, conn.client_port, conn.port)],
                      entries[(Direction.EGRESS, conn.port, conn.client_port)])
    assert sent.ifindex == answered.ifindex == 1  # lo: what marks an entry as standing for two
    assert sent.cookie and answered.cookie and sent.cookie != answered.cookie
    # The process is copied from the kernel's socket map (it fills up only when something else
    # on the host holds ~65k sockets: counted, and shown here).
    full = collector.stats().extra["sock_map_full"]
    assert (sent.tgid, answered.tgid) == (conn.proc.pid, os.getpid()), f"sock_map_full {full}"


def test_udp_on_lo_keeps_an_entry_per_direction(needs_root, collector):  # noqa: F811
    """The two sockets of a UDP exchange end separately: each flow keeps its own entry."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 47952))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"a" * 10, ("127.0.0.1", 47952))
    port = sender.getsockname()[1]
    try:
        entries = kernel_entries(collector, {port, 47952}, 17)
    finally:
        sender.close()
        sink.close()
    assert set(entries) == {(Direction.INGRESS, port, 47952), (Direction.EGRESS, port, 47952)}


def recorded_ring(collector):  # noqa: F811
    """Every ring record the collector drains from now on, and a function that stops that."""
    records: list[bytes] = []
    drain = collector._ring.drain

    def recording() -> list[bytes]:
        got = drain()
        records.extend(got)
        return got

    collector._ring.drain = recording

    def stop() -> None:
        del collector._ring.drain  # the instance attribute: the method shows again

    return records, stop


def assert_sockets(conn: ChildClient, observed: dict, keys) -> None:
    """Each flow carries its local socket's process, cookie, initiator and health."""
    cookies: dict[int, set[int]] = {}
    for key in keys:
        obs = observed[key]
        client_side = conn.local_port(key) == conn.client_port
        process = (conn.proc.pid, conn.comm) if client_side else (os.getpid(), None)
        assert obs.process is not None and obs.process.pid == process[0], key
        assert process[1] is None or obs.process.comm == process[1], key
        assert obs.local_initiated is client_side, key
        assert obs.tcp is not None and obs.tcp.srtt_us > 0, key
        cookies.setdefault(conn.local_port(key), set()).add(obs.socket_cookie)
    assert [len(c) for c in cookies.values()] == [1, 1], cookies  # one socket each side
    assert len(set.union(*cookies.values()) - {0}) == 2, cookies


def test_a_loopback_connection_ends_in_one_record_with_both_sockets(needs_root, collector,  # noqa: F811
                                                                    tmp_path):
    cap = LoCapture(tmp_path / "lo.pcap", "tcp port 47953")
    records, stop = recorded_ring(collector)
    try:
        conn = ChildClient(47953, 5000, 70_000)
        conn.close()
        truth = cap.stop()
        expected = keys_both_ways(host_netns(), truth)
        assert len(expected) == 4, f"capture saw {list(truth)}"
        observed = collect(collector, all_ended(expected))
    finally:
        stop()
    assert differences(observed, expected) == []
    assert_sockets(conn, observed, expected)
    assert {observed[k].end for k in expected} == {EndCause.FIN}
    ports = {conn.client_port, conn.port}
    finals = [r for r in records
              if layout.event_kind(r) in (layout.EV_FLOW_FINAL, layout.EV_LOOPBACK_FINAL)]
    mine = [r for r in finals if set(layout.FLOW_KEY.unpack_from(r, 8)[3:5]) == ports]
    assert [layout.event_kind(r) for r in mine] == [layout.EV_LOOPBACK_FINAL]
    record = mine[0]
    assert layout.FINAL.unpack(record)[1] == 1  # has_reverse
    start = 8 + layout.FLOW_KEY.size
    sides = [layout.decode_value(record, start + at) for at in (0, layout.FLOW_VAL.size)]
    assert {side.tgid for side in sides} == {conn.proc.pid, os.getpid()}
    assert sides[0].cookie != sides[1].cookie and all(side.cookie for side in sides)


def test_a_live_loopback_connection_reads_as_both_sockets_flows(needs_root, collector,  # noqa: F811
                                                                tmp_path):
    cap = LoCapture(tmp_path / "live.pcap", "tcp port 47954")
    conn = ChildClient(47954, 2000, 300)
    try:
        time.sleep(0.1)
        truth = cap.stop()
        expected = keys_both_ways(host_netns(), truth)
        assert len(expected) == 4, f"capture saw {list(truth)}"
        live: dict = {}
        deadline = time.monotonic() + 10
        while not all(k in live and live[k].packets >= t.packets for k, t in expected.items()):
            assert time.monotonic() < deadline, f"live read saw {list(live)}"
            for obs in collector.poll(50, final=True):  # final: young flows too
                live[obs.key] = obs
    finally:
        conn.close()
    assert differences(live, expected) == []
    assert {live[k].end for k in expected} == {EndCause.NONE}
    assert_sockets(conn, live, expected)
    for from_client in (True, False):  # the two flows of one entry: the same packets
        sent = live[conn.key(Direction.EGRESS, from_client)]
        received = live[conn.key(Direction.INGRESS, from_client)]
        assert (sent.packets, sent.octets, sent.tcp_flags, sent.first_ms, sent.last_ms) == (
            received.packets, received.octets, received.tcp_flags, received.first_ms,
            received.last_ms)
        assert sent.socket_cookie != received.socket_cookie
    ended = collect(collector, all_ended(expected))
    assert_sockets(conn, ended, expected)


def entry_of(collector, key: FlowKey) -> bytes | None:  # noqa: F811
    ns_cookie = next(state.cookie for state in collector._attacher.namespaces.values()
                     if state.ns.inode == key.netns)
    return bpfsys.lookup(collector._flows_fd, layout.encode_key(key, ns_cookie),
                         layout.FLOW_VAL.size)


def test_releasing_one_flow_of_a_loopback_entry_reports_both(needs_root, collector):  # noqa: F811
    """The cache released the client's INGRESS flow (idle): its entry, the server's EGRESS flow
    too, goes; the released flow's remainder comes back as a new flow, the other's final counts
    as an update, and later packets start both again from zero."""
    conn = ChildClient(47955, 1000, 100)
    try:
        answer = conn.key(Direction.EGRESS, False)
        view = conn.key(Direction.INGRESS, False)
        live: dict = {}
        deadline = time.monotonic() + 10
        while not (answer in live and view in live):
            assert time.monotonic() < deadline
            for obs in collector.poll(50, final=True):
                live[obs.key] = obs
        before = live[answer].packets
        conn.accepted.sendall(b"x" * 100)
        time.sleep(0.1)
        collector._pending.clear()
        collector.release([view])
        assert entry_of(collector, answer) is None
        pending = {obs.key: obs for obs in collector._pending}
        assert (pending[view].packets, pending[view].octets) == (1, 152)  # the remainder
        assert pending[answer].packets == before + 1 and pending[answer].end == EndCause.NONE
        collector.poll(0)  # the two above
        conn.accepted.sendall(b"y" * 50)
        again: dict = {}
        while not (answer in again and view in again):
            assert time.monotonic() < deadline + 10
            for obs in collector.poll(50, final=True):
                again[obs.key] = obs
    finally:
        conn.close()
    assert [(again[k].packets, again[k].octets) for k in (answer, view)] == [(1, 102)] * 2


def test_a_socket_end_takes_both_sockets_flows_of_a_loopback_connection(needs_root,
                                                                      collector):  # noqa: F811
    """A close the kernel could not finalise (ebpf/endings.py) ends the connection's flows
    through the map: on lo both entries go, and each socket's two flows are reported."""
    conn = ChildClient(47956, 700, 90)
    try:
        keys = [conn.key(direction, from_client) for direction in Direction
                for from_client in (True, False)]
        live: dict = {}
        deadline = time.monotonic() + 10
        while not all(k in live for k in keys):
            assert time.monotonic() < deadline
            for obs in collector.poll(50, final=True):
                live[obs.key] = obs
        ns_cookie = next(state.cookie for state in collector._attacher.namespaces.values()
                         if state.ns.inode == host_netns())
        client_conn = (ns_cookie, 6, 4, LOCALHOST, conn.client_port, LOCALHOST, conn.port)
        out: list = []
        collector._finish(live[keys[0]].socket_cookie, [client_conn], out, {})
        assert [k for k in keys if entry_of(collector, k) is not None] == []
    finally:
        conn.close()
    ended = {obs.key: obs for obs in out}
    assert sorted(ended, key=keys.index) == keys
    for key in keys:
        assert (ended[key].packets, ended[key].octets) == (live[key].packets, live[key].octets)
        assert ended[key].end == EndCause.CLOSED  # no FIN yet: ended by the socket's end
    assert_sockets(conn, ended, keys)


# -- the collector's handling of loopback final records, on synthetic records (no root) -------


class LoopbackFinals(Finals, LoopbackEnds):
    """The state _loopback_finals works on, without a kernel."""


def loopback_record(client_port: int, client_flags: int, server: list | None) -> bytes:
    """A connection from :client_port to :80 on lo ended by the client's packet: the client's
    EGRESS entry, and the server's (none: zeros, as the kernel sends)."""
    other = server if server is not None else [0] * 22 + [bytes(16)]
    return layout.FINAL.pack(
        layout.EV_LOOPBACK_FINAL, int(server is not None), NETNS_COOKIE, LOCALHOST, LOCALHOST,
        client_port, 80, 6, 4, Direction.EGRESS, *value(6, client_flags, True), *other)


def test_a_loopback_record_gives_each_socket_its_two_flows():
    server = value(5, TCP_SYN | TCP_ACK, True, origin=4)
    server[5], server[19], server[22] = 8765, 80, b"server".ljust(16, b"\0")  # cookie, tgid, comm
    finals = LoopbackFinals()
    out: list = []
    finals._loopback_finals([loopback_record(40011, TCP_SYN | TCP_ACK | TCP_RST, server)], out,
                            {})
    by_key = {obs.key: obs for obs in out}

    def key(direction: Direction, from_client: bool) -> FlowKey:
        ports = (40011, 80) if from_client else (80, 40011)
        return FlowKey(NETNS_INODE, direction, 4, 6, LOCALHOST, LOCALHOST, *ports)

    assert set(by_key) == {key(d, c) for d in Direction for c in (True, False)}
    for from_client in (True, False):  # one entry's packets, both flows
        assert by_key[key(Direction.EGRESS, from_client)].packets == (6 if from_client else 5)
        assert by_key[key(Direction.INGRESS, from_client)].packets == (6 if from_client else 5)
    client = [by_key[key(Direction.EGRESS, True)], by_key[key(Direction.INGRESS, False)]]
    served = [by_key[key(Direction.EGRESS, False)], by_key[key(Direction.INGRESS, True)]]
    for obs in client:
        assert (obs.process.pid, obs.process.comm, obs.socket_cookie) == (555, "client", 4321)
        assert obs.local_initiated is True and obs.end == EndCause.RST_SENT
    for obs in served:
        assert (obs.process.pid, obs.process.comm, obs.socket_cookie) == (80, "server", 8765)
        assert obs.local_initiated is False and obs.end == EndCause.RST_RECEIVED
    assert {obs.tcp.srtt_us for obs in out} == {40}


def test_a_loopback_record_of_one_direction_gives_two_flows():
    """Only the client sent (e.g. a SYN answered by nothing, then its RST): its EGRESS flow,
    and the server side's INGRESS flow attributed by the agent (the listener on the port)."""
    finals = LoopbackFinals()
    listener = ProcessInfo(80, "server", 0, 0)
    finals._attr.remember(999, SockInfo(NETNS_COOKIE, listener, 80, 6, 3))
    out: list = []
    finals._loopback_finals([loopback_record(40012, TCP_SYN | TCP_RST, None)], out, {})
    by_key = {obs.key: obs for obs in out}
    sent = FlowKey(NETNS_INODE, Direction.EGRESS, 4, 6, LOCALHOST, LOCALHOST, 40012, 80)
    received = sent._replace(direction=Direction.INGRESS)
    assert set(by_key) == {sent, received}
    assert by_key[sent].process.comm == "client" and by_key[sent].end == EndCause.RST_SENT
    assert by_key[received].process is listener and by_key[received].local_initiated is False
    assert by_key[received].end == EndCause.RST_RECEIVED and by_key[received].tcp is None
    assert by_key[sent].packets == by_key[received].packets == 6
