"""Observations and a fake clock for the agent's tests."""

from __future__ import annotations

import ipaddress

from ebpf.observation import (
    Direction,
    EndCause,
    FlowKey,
    FlowObservation,
    ProcessInfo,
    TcpHealth,
)

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
    )
