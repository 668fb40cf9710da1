"""The collector loads here and its loopback counts equal a tcpdump capture on lo.

One collector per module (bcc compiles for a second or two). Each test makes its own traffic on
ports no other test uses, captures it on lo, polls until the flows ended, and compares flow by
flow: packets, IP bytes, TCP flags exactly; times to the millisecond (1 ms of slack: the
capture stamps packets microseconds after the hook, possibly across a millisecond boundary).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation
from tests.conftest import require_tools, skip_or_fail
from tests.ebpf.conftest import poll_reading_the_map

TIME_SLACK_MS = 1


def open_collector(**kwargs):
    if os.geteuid() != 0:
        skip_or_fail("needs root (BPF)")
    from ebpf.collector import FlowCollector
    from ebpf.errors import EbpfUnavailable

    try:
        return FlowCollector(**kwargs)
    except EbpfUnavailable as exc:
        skip_or_fail(f"eBPF collector unavailable: {exc}")


@pytest.fixture(scope="module")
def collector(loopback_collector):
    return loopback_collector


# -- capture ----------------------------------------------------------------------------------


@dataclass
class Truth:
    packets: int = 0
    octets: int = 0
    tcp_flags: int = 0
    first_ms: float = 0.0
    last_ms: float = 0.0


CapKey = tuple[int, int, bytes, bytes, int, int]  # ip version, proto, src, dst, sport, dport


class LoCapture:
    """tcpdump on lo into a pcap, parsed here (Ethernet framing, IPv4/IPv6, TCP/UDP/ICMP)."""

    def __init__(self, path: Path, bpf_filter: str) -> None:
        require_tools("tcpdump")
        self.path = path
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-nn", "-U", "--immediate-mode", "-s", "200",
             "-w", str(path), bpf_filter],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        line = self.proc.stderr.readline().decode()  # "listening on lo ..." once it captures
        assert "listening" in line, f"tcpdump did not start: {line}"

    def stop(self) -> dict[CapKey, Truth]:
        time.sleep(0.2)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return parse_pcap(self.path.read_bytes())


def parse_pcap(data: bytes) -> dict[CapKey, Truth]:
    magic = struct.unpack_from("<I", data)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), f"not a little-endian pcap: {magic:#x}"
    scale = 1e-3 if magic == 0xA1B2C3D4 else 1e-6  # micro- or nanosecond stamps, to ms
    flows: dict[CapKey, Truth] = {}
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from("<IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        ip = frame[14:]
        if ethertype == 0x0800:
            version, proto, length = 4, ip[9], struct.unpack_from("!H", ip, 2)[0]
            src, dst, l4 = ip[12:16], ip[16:20], ip[(ip[0] & 15) * 4 :]
        elif ethertype == 0x86DD:
            version, proto = 6, ip[6]
            length = struct.unpack_from("!H", ip, 4)[0] + 40
            src, dst, l4 = ip[8:24], ip[24:40], ip[40:]
        else:
            continue
        flags = 0
        if proto in (6, 17):
            sport, dport = struct.unpack_from("!HH", l4)
            if proto == 6:
                flags = l4[13]
        elif proto in (1, 58):
            sport, dport = 0, l4[0] << 8 | l4[1]
        else:
            sport = dport = 0
        ms = sec * 1000 + frac * scale
        truth = flows.setdefault((version, proto, src, dst, sport, dport), Truth(first_ms=ms))
        truth.packets += 1
        truth.octets += length
        truth.tcp_flags |= flags
        truth.last_ms = ms
    return flows


# -- polling ------------------------------------------------------------------------------------


def collect(collector, done: Callable[[dict[FlowKey, FlowObservation]], bool],
            timeout_s: float = 10.0) -> dict[FlowKey, FlowObservation]:
    """Poll until done(latest observation per key) or timeout; returns the latest per key."""
    latest: dict[FlowKey, FlowObservation] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for obs in collector.poll(50):
            latest[obs.key] = obs
        if done(latest):
            break
    return latest


def keys_both_ways(netns: int, cap: dict[CapKey, Truth]) -> dict[FlowKey, Truth]:
    """On lo every captured packet is sent and received by this host: one EGRESS and one
    INGRESS flow per captured direction."""
    out = {}
    for (version, proto, src, dst, sport, dport), truth in cap.items():
        for direction in Direction:
            out[FlowKey(netns, direction, version, proto, src, dst, sport, dport)] = truth
    return out


def differences(observed: dict[FlowKey, FlowObservation],
                expected: dict[FlowKey, Truth]) -> list[str]:
    problems = []
    for key, truth in expected.items():
        obs = observed.get(key)
        name = f"{key.direction.name} {key.protocol} :{key.src_port}>:{key.dst_port}"
        if obs is None:
            problems.append(f"{name}: missing ({truth.packets} packets in the capture)")
            continue
        for field in ("packets", "octets", "tcp_flags"):
            if getattr(obs, field) != getattr(truth, field):
                problems.append(f"{name}: {field} {getattr(obs, field)} != capture "
                                f"{getattr(truth, field)}")
        for field in ("first_ms", "last_ms"):
            if abs(getattr(obs, field) - int(getattr(truth, field))) > TIME_SLACK_MS:
                problems.append(f"{name}: {field} {getattr(obs, field)} vs capture "
                                f"{getattr(truth, field):.3f}")
    return problems


def host_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def all_ended(expected: dict[FlowKey, Truth]):
    def check(latest: dict[FlowKey, FlowObservation]) -> bool:
        return all(k in latest and latest[k].end != EndCause.NONE for k in expected)

    return check


def all_counted(expected: dict[FlowKey, Truth]):
    def check(latest: dict[FlowKey, FlowObservation]) -> bool:
        return all(k in latest and latest[k].packets >= t.packets for k, t in expected.items())

    return check


def my_comm() -> str:
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


# -- traffic -------------------------------------------------------------------------------------


def tcp_exchange(family: int, host: str, port: int, up: int, down: int,
                 client_closes_first: bool = True,
                 connect_to: str | None = None) -> tuple[int, int]:
    """A real TCP connection on lo; returns (client port, server port). The client connects to
    `connect_to` when given (e.g. 127.0.0.1 to a dual-stack server on ::)."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    client = socket.create_connection((connect_to or host, port))
    accepted, _ = server.accept()
    client.sendall(b"u" * up)
    received = 0
    while received < up:
        received += len(accepted.recv(1 << 16))
    accepted.sendall(b"d" * down)
    received = 0
    while received < down:
        received += len(client.recv(1 << 16))
    client_port = client.getsockname()[1]
    first, second = (client, accepted) if client_closes_first else (accepted, client)
    first.close()
    time.sleep(0.05)
    second.close()
    server.close()
    return client_port, port


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,host,port,up,down,client_first",
    [
        (socket.AF_INET, "127.0.0.1", 47101, 100_000, 300, True),  # GSO packets on lo
        (socket.AF_INET, "127.0.0.1", 47102, 10, 5000, False),
        (socket.AF_INET6, "::1", 47103, 3000, 70_000, True),
    ],
)
def test_tcp_counts_equal_capture(needs_root, collector, tmp_path, family, host, port, up,
                                  down, client_first):
    cap = LoCapture(tmp_path / "tcp.pcap", f"tcp port {port}")
    client_port, _ = tcp_exchange(family, host, port, up, down, client_first)
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    assert len(expected) == 4, f"capture saw {list(truth)}"
    observed = collect(collector, all_ended(expected))
    assert differences(observed, expected) == []
    me, comm = os.getpid(), my_comm()
    for key in expected:
        obs = observed[key]
        assert obs.end == EndCause.FIN, f"{key}: {obs.end}"
        assert obs.process is not None and (obs.process.pid, obs.process.comm) == (me, comm)
        assert obs.process.uid == os.getuid()
        assert obs.socket_cookie != 0
        # The client's socket: sends from client_port, receives to it.
        client_side = (key.src_port if key.direction == Direction.EGRESS
                       else key.dst_port) == client_port
        assert obs.local_initiated is client_side, key
        assert obs.tcp is not None and obs.tcp.srtt_us > 0 and obs.tcp.snd_cwnd > 0
        assert obs.tcp.min_rtt_us <= obs.tcp.srtt_us
        assert obs.tcp.retrans_packets == 0
        assert obs.ifindex == 1


def test_udp_counts_equal_capture(needs_root, collector, tmp_path):
    cap = LoCapture(tmp_path / "udp.pcap", "udp port 47201")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 47201))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sizes = [1, 100, 1472, 9000, 40_000]
    for size in sizes:
        sender.sendto(b"x" * size, ("127.0.0.1", 47201))
    for _ in sizes:
        receiver.recv(65535)
    sender_port = sender.getsockname()[1]
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    assert len(expected) == 2
    observed = collect(collector, all_counted(expected))
    assert differences(observed, expected) == []
    key = next(iter(truth))
    assert truth[key].octets == sum(sizes) + 28 * len(sizes)
    sender.close()
    receiver.close()
    observed = collect(collector, all_ended(expected))
    for flow, obs in observed.items():
        if flow in expected:
            assert obs.end == EndCause.CLOSED
            assert obs.process is not None and obs.process.pid == os.getpid()
            assert obs.local_initiated is None and obs.tcp is None
    assert {k.src_port for k in expected} == {sender_port}


def test_ping_counts_equal_capture(needs_root, collector, tmp_path):
    require_tools("ping")
    cap = LoCapture(tmp_path / "icmp.pcap", "icmp and host 127.0.0.3")
    run = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-s", "500", "127.0.0.3"],
                         capture_output=True, timeout=20)
    assert run.returncode == 0, run.stderr
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    assert {k.dst_port for k in expected} == {0x0800, 0x0000}  # echo request, echo reply
    observed = collect(collector, all_ended({k: t for k, t in expected.items()
                                             if k.dst_port == 0x0800 and k.direction == 1}))
    assert differences(observed, expected) == []
    request = FlowKey(host_netns(), Direction.EGRESS, 4, 1, bytes([127, 0, 0, 1]),
                      bytes([127, 0, 0, 3]), 0, 0x0800)
    assert observed[request].packets == 3 and observed[request].octets == 3 * 528
    assert observed[request].process is not None
    assert observed[request].process.comm == "ping"
    assert observed[request].end == EndCause.CLOSED


def test_refused_connection_ends_with_rst_received(needs_root, collector, tmp_path):
    cap = LoCapture(tmp_path / "rst.pcap", "tcp port 47301")
    client = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", 47301))
    client.close()
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    client_side = {k: t for k, t in expected.items()
                   if (k.direction == Direction.EGRESS) == (k.dst_port == 47301)}
    observed = collect(collector, all_ended(client_side))
    assert differences(observed, expected) == []
    for key in client_side:
        assert observed[key].end == EndCause.RST_RECEIVED
        assert observed[key].local_initiated is True


def test_abortive_close_ends_with_rst(needs_root, collector, tmp_path):
    cap = LoCapture(tmp_path / "abort.pcap", "tcp port 47302")
    server = socket.socket()
    server.bind(("127.0.0.1", 47302))
    server.listen()
    client = socket.create_connection(("127.0.0.1", 47302))
    accepted, _ = server.accept()
    client.sendall(b"hello")
    accepted.recv(100)
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()  # RST
    time.sleep(0.05)
    client.close()
    server.close()
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    observed = collect(collector, all_ended(expected))
    assert differences(observed, expected) == []
    for key in expected:
        server_side = (key.src_port if key.direction == Direction.EGRESS
                       else key.dst_port) == 47302
        want = EndCause.RST_SENT if server_side else EndCause.RST_RECEIVED
        assert observed[key].end == want, key


def test_excluded_socket_is_never_reported(needs_root, collector):
    exporter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.exclude_socket(exporter)  # binds it: an unbound socket has no port yet
    port = exporter.getsockname()[1]
    assert port != 0
    before = collector.stats().extra["excluded_packets"]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 47401))
    for _ in range(5):
        exporter.sendto(b"ipfix" * 100, ("127.0.0.1", 47401))
    # A control datagram from another socket must still be seen.
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.sendto(b"c", ("127.0.0.1", 47401))
    control_port = control.getsockname()[1]
    observed = collect(collector, lambda seen: any(k.src_port == control_port for k in seen))
    assert any(k.src_port == control_port for k in observed)
    assert not [k for k in observed if port in (k.src_port, k.dst_port)]
    # Each loopback packet is checked for both of its ends: sent and received.
    assert collector.stats().extra["excluded_packets"] - before == 5
    for s in (exporter, sink, control):
        s.close()


def test_release_drops_kernel_state_and_later_packets_come_back(needs_root, collector):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 47501))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"a" * 10, ("127.0.0.1", 47501))
    key = FlowKey(host_netns(), Direction.EGRESS, 4, 17, bytes([127, 0, 0, 1]),
                  bytes([127, 0, 0, 1]), 0, 47501)

    def mine(seen):
        return [k for k in seen if k.dst_port == 47501 and k.direction == Direction.EGRESS]

    observed = collect(collector, lambda seen: bool(mine(seen)))
    key = mine(observed)[0]
    assert observed[key].packets == 1
    collector.release([key])
    assert key not in {o.key for o in poll_reading_the_map(collector)}  # gone from the map
    sender.sendto(b"b" * 20, ("127.0.0.1", 47501))
    sender.sendto(b"c" * 30, ("127.0.0.1", 47501))
    again = collect(collector, lambda seen: key in seen)
    assert (again[key].packets, again[key].octets) == (2, 20 + 30 + 2 * 28)
    sender.close()
    sink.close()


def test_connection_existing_before_attach_is_picked_up(needs_root, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 47601))
    server.listen()
    client = socket.create_connection(("127.0.0.1", 47601))
    accepted, _ = server.accept()
    client.sendall(b"before" * 1000)  # not counted: the collector does not exist yet
    accepted.recv(1 << 16)
    late = open_collector(poll_interval_s=0.2)
    try:
        cap = LoCapture(tmp_path / "late.pcap", "tcp port 47601")
        client.sendall(b"after" * 200)
        got = 0
        while got < 1000:
            got += len(accepted.recv(1 << 16))
        accepted.sendall(b"reply")
        client.recv(100)
        client.close()
        time.sleep(0.05)
        accepted.close()
        truth = cap.stop()
        expected = keys_both_ways(host_netns(), truth)
        observed = collect(late, all_ended(expected))
        assert differences(observed, expected) == []
        for key, obs in observed.items():
            if key in expected:
                assert obs.end == EndCause.FIN
                assert obs.process is not None and obs.process.pid == os.getpid()
                assert obs.tcp is not None and obs.tcp.srtt_us > 0
        # The server side was accepted by a listener that predates the collector.
        server_egress = next(k for k in expected
                             if k.direction == Direction.EGRESS and k.src_port == 47601)
        assert observed[server_egress].local_initiated is False
    finally:
        late.close()
        server.close()


def test_full_flow_map_is_counted_not_silent(needs_root):
    small = open_collector(max_flows=16, poll_interval_s=0.2)
    try:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(47700, 47740):
            sender.sendto(b"x", ("127.0.0.1", port))  # 2 flows each on lo (sent, received)
        sender.close()
        time.sleep(0.1)
        small.poll(0)
        stats = small.stats()
        assert stats.map_capacity == 16
        assert stats.flows_in_map <= 16
        assert stats.map_full_drops >= 80 - 16
        assert stats.events_lost == 0
    finally:
        small.close()


def test_close_detaches_everything(needs_root):
    probe = open_collector(poll_interval_s=0.2)
    fds = list(probe._loaded.link_fds)
    tcx = [fd for state in probe._attacher.namespaces.values()
           for links in state.links.values() for fd in links]
    assert fds and tcx
    link_ids = {_link_id(fd) for fd in fds + tcx}
    probe.close()
    live = _live_link_ids()
    assert not link_ids & live, "links still attached after close()"


def _link_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("link_id:"):
                return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a BPF link")


def _live_link_ids() -> set[int]:
    """Ids of BPF links held open by any process (from /proc/*/fdinfo)."""
    ids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("link_id:"):
                            ids.add(int(line.split()[1]))
            except OSError:
                continue
    return ids


def test_capture_parser_reads_a_known_pcap():
    """The ground truth itself: a pcap in tcpdump's format holding a known frame twice."""
    frame = (b"\0" * 12 + b"\x08\x00"
             + bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
             + struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x12, 1000, 0, 0))
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", 1_700_000_000, 250_000, len(frame), len(frame)) + frame
    flows = parse_pcap(header + record + record)
    truth = flows[(4, 6, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 1234, 80)]
    assert (truth.packets, truth.octets, truth.tcp_flags) == (2, 80, 0x12)
    assert truth.first_ms == 1_700_000_000_250.0


def kernel_losses(collector) -> dict[str, int]:  # type: ignore[no-untyped-def]
    stats = collector.stats()
    return {"events_lost": stats.events_lost, "map_full_drops": stats.map_full_drops}


def test_reused_client_port_gives_one_flow_per_connection(needs_root, collector, tmp_path):
    """A client port reused while the server holds TIME_WAIT: three connections on one 5-tuple
    must be three flows, each ended, not one merged flow."""
    lost_before = kernel_losses(collector)
    cap = LoCapture(tmp_path / "reuse.pcap", "tcp port 47801")
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 47801))
    server.listen()
    ended: dict[FlowKey, list[FlowObservation]] = {}
    latest: dict[FlowKey, FlowObservation] = {}
    for _ in range(3):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(("127.0.0.1", 47802))
        client.connect(("127.0.0.1", 47801))
        accepted, _ = server.accept()
        client.sendall(b"q" * 100)
        accepted.recv(100)
        accepted.close()  # the server closes first: it holds TIME_WAIT, the client may reuse
        client.recv(10)
        client.close()
        time.sleep(0.05)
    server.close()
    truth = cap.stop()
    expected = keys_both_ways(host_netns(), truth)
    assert len(expected) == 4
    seen: list[tuple] = []  # every observation of the 5-tuple, for a failure's message
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for obs in collector.poll(50):
            latest[obs.key] = obs
            if obs.key in expected:
                seen.append((obs.key.direction.name, obs.key.src_port, obs.packets,
                             obs.end.name, obs.first_ms, obs.last_ms))
            if obs.end != EndCause.NONE and obs.key in expected:
                ended.setdefault(obs.key, []).append(obs)
        if all(len(ended.get(k, ())) == 3 for k in expected):
            break
    # The ring buffer is drained only by the polls above: a flood of connections elsewhere on
    # the host (the collector sees every namespace) can overflow it or fill the flow map first.
    # Such losses are counted; a failure says whether there were any.
    losses = {name: n - lost_before[name] for name, n in kernel_losses(collector).items()}
    for key, truth_flow in expected.items():
        flows = ended.get(key, [])
        assert len(flows) == 3, (
            f"{key}: {len(flows)} ended flows; kernel losses meanwhile {losses}; seen {seen}")
        assert sum(f.packets for f in flows) == truth_flow.packets
        assert sum(f.octets for f in flows) == truth_flow.octets
        assert all(f.tcp_flags & 0x02 for f in flows)  # each one starts with its own SYN
        assert flows[0].first_ms <= flows[1].first_ms <= flows[2].first_ms
