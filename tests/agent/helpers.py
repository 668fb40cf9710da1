"""Observations and a fake clock for the agent's tests."""

from __future__ import annotations

import ipaddress
import socket
import struct

from ebpf.observation import (
    Direction,
    EndCause,
    FlowKey,
    FlowObservation,
    ProcessInfo,
    TcpHealth,
)
from ipfix.decoder import Decoder

T0 = 1_700_000_000_000  # epoch ms


class FakeClock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def key(
    sport: int = 40000,
    dport: int = 80,
    *,
    src: str = "10.0.0.1",
    dst: str = "10.0.0.2",
    direction: Direction = Direction.EGRESS,
    protocol: int = 6,
) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return FlowKey(0, direction, s.version, protocol, s.packed, d.packed, sport, dport)


def reverse(k: FlowKey) -> FlowKey:
    return FlowKey(
        k.netns,
        Direction(1 - k.direction),
        k.ip_version,
        k.protocol,
        k.dst_addr,
        k.src_addr,
        k.dst_port,
        k.src_port,
    )


def obs(
    k: FlowKey,
    octets: int,
    packets: int,
    first_ms: int,
    last_ms: int,
    *,
    flags: int = 0x18,
    end: EndCause = EndCause.NONE,
    ifindex: int = 2,
    process: ProcessInfo | None = None,
    tcp: TcpHealth | None = None,
    local_initiated: bool | None = None,
) -> FlowObservation:
    return FlowObservation(
        key=k,
        ifindex=ifindex,
        octets=octets,
        packets=packets,
        tcp_flags=flags,
        first_ms=first_ms,
        last_ms=last_ms,
        process=process,
        tcp=tcp,
        end=end,
        local_initiated=local_initiated,
    )


class Sink:
    """A loopback UDP collector for tests: receives datagrams and decodes them."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.socket.bind((host, 0))
        self.host = host
        self.port = self.socket.getsockname()[1]
        self.decoder = Decoder()
        self.datagrams: list[bytes] = []
        self.messages: list = []

    def receive(self, timeout: float = 0.5, expect: int = 0) -> list:
        """Decoded messages received now (waits up to `timeout` once nothing more comes, and until
        `expect` messages arrived at most `timeout` after the last)."""
        new = []
        self.socket.settimeout(timeout)
        while True:
            try:
                data, sender = self.socket.recvfrom(65535)
            except TimeoutError:
                break
            self.datagrams.append(data)
            new += self.decoder.feed(data, sender[:2])
            self.socket.settimeout(0.05 if len(new) >= expect else timeout)
        self.messages += new
        return new

    def records(self, timeout: float = 0.5) -> list[dict]:
        return [r for m in self.receive(timeout) for r in m.records]

    def close(self) -> None:
        self.socket.close()


def read_stream(conn: socket.socket, quiet: float = 0.3) -> bytes:
    """Everything a TCP collector connection carries until it is quiet for `quiet` s or closed."""
    conn.settimeout(quiet)
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def split_ipfix(stream: bytes) -> list[bytes]:
    """IPFIX over a stream: each message says its own length (RFC 7011 section 10.4). A message
    still arriving is left out."""
    messages = []
    while len(stream) >= 4:
        length = struct.unpack_from(">H", stream, 2)[0]
        if length < 16 or len(stream) < length:
            break
        messages.append(stream[:length])
        stream = stream[length:]
    return messages
