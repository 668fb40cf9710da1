"""Ground truth: tcpdump on a lab interface, parsed with scapy into per-flow totals.

Flows are keyed like ebpf.observation.FlowKey without the network namespace (a pcap does not carry
it): (direction relative to the captured endpoint, ip_version, protocol, src, dst, sport, dport),
addresses packed, ICMP ports as NetFlow exporters put them (0, type << 8 | code).
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ebpf.observation import Direction, FlowKey

CaptureKey = tuple[Direction, int, int, bytes, bytes, int, int]

SNAPLEN = 256  # every header we parse (Ethernet + IPv6 + TCP with options) fits


def capture_key(key: FlowKey) -> CaptureKey:
    """The capture's key of a collector's flow key (drops the network namespace)."""
    return (key.direction, key.ip_version, key.protocol, key.src_addr, key.dst_addr,
            key.src_port, key.dst_port)


@dataclass
class CaptureFlow:
    """Totals of one direction of one flow as the capture saw it."""

    octets: int = 0  # IP-layer bytes: IPv4 total length, IPv6 payload length + 40
    packets: int = 0
    tcp_flags: int = 0
    first_s: float = 0.0  # capture timestamps, Unix seconds
    last_s: float = 0.0
    syn: int = 0
    fin: int = 0
    rst: int = 0
    retrans_packets: int = 0  # TCP segments carrying sequence space already sent
    retrans_bytes: int = 0  # their IP-layer bytes
    payload: int = 0  # TCP payload bytes, retransmissions included
    retrans_payload: int = 0
    fin_s: float | None = None  # time of the first FIN
    segments: list[tuple[float, int, int, int]] = field(default_factory=list, repr=False)
    rst_s: float | None = None  # time of the first RST
    _isn: int | None = field(default=None, repr=False)
    _next_seq: int = field(default=0, repr=False)

    @property
    def first_ms(self) -> float:
        return self.first_s * 1000

    @property
    def last_ms(self) -> float:
        return self.last_s * 1000

    def add(self, ts: float, ip_octets: int) -> None:
        if self.packets == 0:
            self.first_s = ts
        self.packets += 1
        self.octets += ip_octets
        self.last_s = ts

    def add_tcp(self, seq: int, ack: int, flags: int, payload: int, ip_octets: int) -> None:
        """Retransmission = a segment whose sequence space starts below what was already sent."""
        self.tcp_flags |= flags
        self.syn += bool(flags & 0x02)
        self.fin += bool(flags & 0x01)
        self.rst += bool(flags & 0x04)
        self.payload += payload
        if flags & 0x01 and self.fin_s is None:
            self.fin_s = self.last_s
        if flags & 0x04 and self.rst_s is None:
            self.rst_s = self.last_s
        seq_len = payload + bool(flags & 0x02) + bool(flags & 0x01)
        self.segments.append((self.last_s, seq, ack if flags & 0x10 else -1, seq_len))
        if self._isn is None:
            self._isn = seq
        relative = (seq - self._isn) % (1 << 32)
        if seq_len == 0:
            return
        if relative < self._next_seq:
            self.retrans_packets += 1
            self.retrans_bytes += ip_octets
            self.retrans_payload += payload
        self._next_seq = max(self._next_seq, relative + seq_len)


def rtt_samples_ms(sent: CaptureFlow, returned: CaptureFlow) -> list[float]:
    """RTT samples as the sender of `sent` takes them (Karn's rule: segments sent once only):
    time from a segment to the first packet of `returned` acknowledging all of it."""
    counts: dict[int, int] = {}
    for _, seq, _, seq_len in sent.segments:
        if seq_len:
            counts[seq] = counts.get(seq, 0) + 1
    acks = [(ts, ack) for ts, _, ack, _ in returned.segments if ack >= 0]
    samples, start = [], 0
    for ts, seq, _, seq_len in sent.segments:
        if not seq_len or counts[seq] > 1:
            continue
        end = (seq + seq_len) % (1 << 32)
        while start < len(acks) and acks[start][0] < ts:
            start += 1
        for ack_ts, ack in acks[start:]:
            if (ack - end) % (1 << 32) < (1 << 31):  # ack >= end, modulo sequence wrap
                samples.append((ack_ts - ts) * 1000)
                break
    return samples


@dataclass
class CaptureStats:
    captured: int
    dropped_by_kernel: int


class Capture:
    """tcpdump -w on one interface (inside its namespace), started and confirmed listening before
    traffic, stopped after. `flows()` parses the file."""

    def __init__(self, command_prefix: list[str], ifname: str, path: Path,
                 local_macs: Iterable[str], local_addrs: Iterable[bytes]):
        self.ifname, self.path = ifname, path
        self.local_macs = {m.lower() for m in local_macs}
        self.local_addrs = set(local_addrs)
        self._argv = [*command_prefix, "tcpdump", "-i", ifname, "-w", str(path), "-s",
                      str(SNAPLEN), "-n", "-U", "--immediate-mode", "ip or ip6"]
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: list[str] = []
        self.stats: CaptureStats | None = None

    def start(self, timeout_s: float = 10.0) -> Capture:
        self._process = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        listening = threading.Event()

        def read_stderr() -> None:
            assert self._process is not None and self._process.stderr is not None
            for raw in self._process.stderr:
                line = raw.decode(errors="replace")
                self._stderr.append(line)
                if "listening on" in line:
                    listening.set()
            listening.set()

        self._reader = threading.Thread(target=read_stderr, daemon=True)
        self._reader.start()
        if not listening.wait(timeout_s) or self._process.poll() is not None:
            self.kill()
            raise RuntimeError(f"tcpdump on {self.ifname} did not start: {''.join(self._stderr)}")
        return self

    def stop(self, settle_s: float = 0.05) -> CaptureStats:
        """Stop after the last packet; `settle_s` lets in-flight packets reach the capture."""
        assert self._process is not None
        time.sleep(settle_s)
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        # The summary lines come last on stderr: the reader ends at EOF once it has them (a
        # fixed short sleep was not enough for it to be scheduled on a loaded machine).
        self._reader.join(timeout=30)
        summary = "".join(self._stderr)
        captured = re.search(r"(\d+) packets? captured", summary)
        dropped = re.search(r"(\d+) packets? dropped by kernel", summary)
        if captured is None or dropped is None:
            raise RuntimeError(f"tcpdump on {self.ifname} gave no summary: {summary}")
        self.stats = CaptureStats(int(captured.group(1)), int(dropped.group(1)))
        if self.stats.dropped_by_kernel:
            raise RuntimeError(f"tcpdump on {self.ifname} dropped {self.stats.dropped_by_kernel}"
                               " packets: the ground truth is incomplete")
        return self.stats

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.stats is None and self._process is not None and self._process.poll() is None:
            if exc[0] is None:
                self.stop()
            else:
                self.kill()

    def flows(self, after: Capture | None = None) -> dict[CaptureKey, CaptureFlow]:
        """Per-flow totals; with `after`, an earlier capture of the same interface that stopped
        when nothing was passing, the totals of both as if one capture had run throughout."""
        earlier = after.flows() if after is not None else None
        return parse_pcap(self.path, self.local_macs, self.local_addrs, earlier)


def parse_pcap(path: Path, local_macs: set[str], local_addrs: set[bytes],
               flows: dict[CaptureKey, CaptureFlow] | None = None
               ) -> dict[CaptureKey, CaptureFlow]:
    """Per-flow totals (added to `flows`, an earlier file's, when given). A packet is EGRESS when
    the captured endpoint sent it: its source MAC is the endpoint's (or, without Ethernet, its
    source address is one of the endpoint's).

    scapy reads the file; headers are decoded with struct because full dissection runs at ~3,500
    packets/s, too slow for multi-megabyte transfers. `parse_pcap_dissected` is the same with
    scapy's dissectors, and the lab's self-test checks that both agree."""
    from scapy.utils import RawPcapReader

    macs = {bytes.fromhex(m.replace(":", "")) for m in local_macs}
    flows = {} if flows is None else flows
    with RawPcapReader(str(path)) as reader:
        ethernet = reader.linktype == 1
        for frame, meta in reader:
            offset = 14 if ethernet else 0
            if ethernet and frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            header = _ip_header(frame, offset)
            if header is None:
                continue
            version, proto, src, dst, octets, l4 = header
            egress = frame[6:12] in macs if ethernet else src in local_addrs
            direction = Direction.EGRESS if egress else Direction.INGRESS
            sport = dport = 0
            if proto in (6, 17):
                sport, dport = struct.unpack_from("!HH", frame, l4)
            elif proto in (1, 58):
                dport = frame[l4] << 8 | frame[l4 + 1]
            flow = flows.setdefault((direction, version, proto, src, dst, sport, dport),
                                    CaptureFlow())
            flow.add(meta.sec + meta.usec / 1e6, octets)
            if proto == 6:
                seq, ack = struct.unpack_from("!II", frame, l4 + 4)
                flags = frame[l4 + 13]
                payload = octets - (l4 - offset) - (frame[l4 + 12] >> 4) * 4
                flow.add_tcp(seq, ack, flags, payload, octets)
    return flows


def _ip_header(frame: bytes, offset: int) -> tuple[int, int, bytes, bytes, int, int] | None:
    """(version, protocol, src, dst, IP-layer octets, offset of the L4 header)."""
    version = frame[offset] >> 4
    if version == 4:
        ihl = (frame[offset] & 0x0F) * 4
        octets = struct.unpack_from("!H", frame, offset + 2)[0]
        return (4, frame[offset + 9], frame[offset + 12:offset + 16],
                frame[offset + 16:offset + 20], octets, offset + ihl)
    if version == 6:
        octets = struct.unpack_from("!H", frame, offset + 4)[0] + 40
        return (6, frame[offset + 6], frame[offset + 8:offset + 24],
                frame[offset + 24:offset + 40], octets, offset + 40)
    return None


def parse_pcap_dissected(path: Path, local_macs: set[str], local_addrs: set[bytes]
                         ) -> dict[CaptureKey, CaptureFlow]:
    """parse_pcap with scapy's dissectors: the slow, independent reference."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapReader

    macs = {m.lower() for m in local_macs}
    flows: dict[CaptureKey, CaptureFlow] = {}
    with PcapReader(str(path)) as reader:
        for packet in reader:
            if IP in packet:
                ip = packet[IP]
                version, octets, proto, ip_header = 4, ip.len, ip.proto, ip.ihl * 4
                src, dst = _pack(4, ip.src), _pack(4, ip.dst)
            elif IPv6 in packet:
                ip = packet[IPv6]
                version, octets, proto, ip_header = 6, ip.plen + 40, ip.nh, 40
                src, dst = _pack(6, ip.src), _pack(6, ip.dst)
            else:
                continue
            egress = packet[Ether].src.lower() in macs if Ether in packet else src in local_addrs
            direction = Direction.EGRESS if egress else Direction.INGRESS
            sport = dport = 0
            l4 = ip.payload
            if isinstance(l4, TCP | UDP):
                sport, dport = l4.sport, l4.dport
            elif isinstance(l4, ICMP) or proto == 58:
                raw = bytes(l4)
                dport = raw[0] << 8 | raw[1]
            flow = flows.setdefault((direction, version, proto, src, dst, sport, dport),
                                    CaptureFlow())
            flow.add(float(packet.time), octets)
            if isinstance(l4, TCP):
                payload = octets - ip_header - l4.dataofs * 4
                flow.add_tcp(l4.seq, l4.ack, int(l4.flags), payload, octets)
    return flows


def _pack(version: int, text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, text)
