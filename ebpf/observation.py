"""What the kernel reports about one flow: the typed interface between ebpf/ and bridge/.

Nothing here knows about IPFIX. The agent (bridge.cache) turns observations into flow records.
Counters are cumulative since the kernel first saw the flow; the cache computes deltas, so an
observation can be read as often as wanted without double counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol


class Direction(IntEnum):
    """Relative to this host; values are IANA flowDirection (61)."""

    INGRESS = 0
    EGRESS = 1


class EndCause(IntEnum):
    """How the kernel saw the flow end. NONE while it is live."""

    NONE = 0
    FIN = 1  # orderly close (FIN exchanged)
    RST_SENT = 2  # this host reset the connection
    RST_RECEIVED = 3  # the peer reset the connection
    CLOSED = 4  # the socket went away without a TCP ending (UDP, ICMP, abort)


# The per-flow classes below are built for every flow a poll reports (100k+ per poll): a frozen
# dataclass's __init__ (object.__setattr__ per field) costs 3x a plain slotted one. They stay
# hashable by value (unsafe_hash); treat them as immutable all the same.
# FlowKey is a tuple: every cache, table and map in the agent looks flows up by it several times
# per observation, and a tuple hashes and compares in C (a dataclass's __hash__ and __eq__ are
# Python functions; bench.churn A/B: agent 77 -> 73 ms per 1000 connections).
class FlowKey(NamedTuple):
    """One direction of one flow, in one network namespace."""

    netns: int  # network namespace inode number
    direction: Direction
    ip_version: int  # 4 or 6
    protocol: int  # IPPROTO_* (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6)
    src_addr: bytes  # packed: 4 bytes for IPv4, 16 for IPv6
    dst_addr: bytes
    src_port: int  # 0 for ICMP
    dst_port: int  # ICMP: type << 8 | code, as NetFlow exporters do


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The local process that owns the flow's local socket."""

    pid: int
    comm: str
    uid: int
    cgroup_id: int


@dataclass(slots=True, unsafe_hash=True)
class TcpHealth:
    """Socket-level TCP state (both directions share one socket)."""

    retrans_packets: int  # cumulative, segments this host retransmitted
    retrans_bytes: int  # cumulative
    srtt_us: int  # smoothed RTT, microseconds (0 = unknown)
    min_rtt_us: int
    snd_cwnd: int  # segments
    state: int  # TCP state as in include/net/tcp_states.h (1 ESTABLISHED ... 12 NEW_SYN_RECV)


@dataclass(slots=True, unsafe_hash=True)
class FlowObservation:
    key: FlowKey
    ifindex: int  # interface the packets went through (0 = unknown)
    octets: int  # IP-layer bytes (headers + payload), cumulative
    packets: int  # packets as on the wire (GSO segments counted), cumulative
    tcp_flags: int  # OR of the TCP flags seen (low 8 bits as tcpControlBits)
    first_ms: int  # first packet, Unix epoch milliseconds
    last_ms: int  # last packet, Unix epoch milliseconds
    socket_cookie: int = 0
    process: ProcessInfo | None = None
    tcp: TcpHealth | None = None
    end: EndCause = EndCause.NONE  # not NONE: the kernel has seen the flow end; this is final
    # TCP: True when the local socket connected, False when it was accepted; None: unknown
    # (UDP, ICMP, or a connection that existed before the agent and had no listener here).
    local_initiated: bool | None = None


@dataclass(frozen=True, slots=True)
class SourceStats:
    """Kernel-side health, exported as agent metrics. Every loss is counted here."""

    flows_in_map: int
    map_capacity: int
    map_full_drops: int  # packets/flows not tracked because a bounded map was full
    events_lost: int  # ring buffer reservations that failed
    extra: dict[str, int]


class ObservationSource(Protocol):
    """A producer of observations: the eBPF collector, or a synthetic source in tests."""

    def poll(self, timeout_ms: int, *, final: bool = False) -> list[FlowObservation]:
        """Observations of flows that changed since the last poll (live flows read from the
        kernel's maps in batches) and of flows that ended (from the ring buffer). Waits at most
        timeout_ms for end-of-flow events. A source may hold back a flow that only just began
        (most end soon, and are cheaper reported once, ended); `final` (the last poll before
        the agent stops) reports every flow."""
        ...

    def release(self, keys: list[FlowKey]) -> None:
        """The cache has expired these flows (idle): drop their kernel state. Counts that arrive
        after the last poll are not lost: they come back as a new flow in a later poll."""
        ...

    def stats(self) -> SourceStats: ...

    def close(self) -> None: ...
