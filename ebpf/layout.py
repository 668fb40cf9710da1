"""Byte layouts of the structs in flows.bpf.c, and their decoding into observation parts.

Kept next to each other so that a change to a C struct has one obvious Python twin.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from ebpf.observation import Direction, FlowKey, ProcessInfo

# struct flow_key: netns cookie, saddr[16], daddr[16], sport, dport, proto, ipver, direction
FLOW_KEY = struct.Struct("<Q16s16sHHBBBx")
# Byte offsets in a packed flow_key: a kernel key's protocol and direction without unpacking it.
KEY_PROTOCOL = struct.calcsize("<Q16s16sHH")
KEY_DIRECTION = KEY_PROTOCOL + 2
# struct flow_val: 9 u64 counters and ids, 13 u32 (the last five: peer_fin_end, fin_state, and
# the sending process's tgid, uid, origin), padding, comm
FLOW_VAL_FORMAT = "9Q13I4x16s"
FLOW_VAL = struct.Struct("<" + FLOW_VAL_FORMAT)
FLOW_VAL_FIRST_NS_OFFSET = 16
FLOW_VAL_LAST_NS_OFFSET = 24
# struct sock_info: netns, cgroup_id, tgid, uid, bound_port, protocol, origin, comm
SOCK_INFO = struct.Struct("<QQIIHBB4x16s")
# struct port_key: netns, port, proto
PORT_KEY = struct.Struct("<QHB5x")
# struct event header, then a struct sock_info
EVENT = struct.Struct("<IIQQ16s16sHHBB2x")
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")

EV_TCP_CLOSE = 1
EV_TCP_DESTROY = 2
EV_SOCK_RELEASE = 3
EV_FLOW_RETIRED = 4
EV_FLOW_FINAL = 5
EV_LOOPBACK_FINAL = 6  # a TCP connection on lo: both sockets in one record (ebpf/loopback.py)
SOCKET_END_KINDS = (EV_TCP_CLOSE, EV_TCP_DESTROY, EV_SOCK_RELEASE)
RETIRED_HEADER = struct.Struct("<I4x")

CTR_NAMES = (
    "flow_map_full",
    "sock_map_full",
    "events_lost",
    "fragments_without_first",
    "truncated_packets",
    "port_map_full",
    "excluded_packets",
)

ICMP_PROTOCOLS = (1, 58)
V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"

# A connection as the local socket sees it: (netns cookie, protocol, ip version, local address,
# local port, remote address, remote port); ICMP ports are 0.
ConnId = tuple[int, int, int, bytes, int, bytes, int]


class FlowValue(NamedTuple):
    """struct flow_val (a NamedTuple: built straight from struct.unpack, 3x cheaper than a
    dataclass at 100k flows per poll)."""

    octets: int
    packets: int
    first_ns: int
    last_ns: int
    tcp_flags: int
    cookie: int
    cgroup_id: int
    retrans_packets: int
    retrans_bytes: int
    ifindex: int
    seq_end: int
    srtt_us: int
    min_rtt_us: int
    snd_cwnd: int
    state: int
    seq_valid: int = 0
    gen: int = 0  # bumped when a new connection reuses the key
    peer_fin_end: int = 0
    fin_state: int = 0
    tgid: int = 0  # the sending socket's process (egress TCP), when origin is not 0
    uid: int = 0
    origin: int = 0
    comm: bytes = bytes(16)


_make_value = FlowValue._make

# struct final: kind, has_reverse, the key of the packet that ended the connection (netns,
# saddr, daddr, sport, dport, proto, ipver, direction), its value, the other direction's value.
# Decoded as one flat tuple, not a FlowValue per direction (two per ended connection cost a
# third of the collector under churn): FINAL_OWN / FINAL_OTHER are where the two values start.
FINAL = struct.Struct("<IIQ16s16sHHBBBx" + FLOW_VAL_FORMAT + FLOW_VAL_FORMAT)
FINAL_KEY_BYTES = slice(8, 8 + FLOW_KEY.size)
FINAL_IPVER_AT = 8 + FLOW_KEY.size - 3  # bytes of the key that a decoder is chosen by
FINAL_DIRECTION_AT = FINAL_IPVER_AT + 1

# struct flow_val's fields in memory order with their struct codes (FLOW_VAL_FORMAT spelled out).
_VALUE_CODES = ([(name, "Q") for name in FlowValue._fields[:9]]
                + [(name, "I") for name in FlowValue._fields[9:22]] + [("", "4x"), ("comm", "16s")])


def _value_format(names: tuple[str, ...]) -> str:
    """FLOW_VAL_FORMAT decoding only the named fields; the others are skipped as pad bytes."""
    return "".join(code if name in names else f"{struct.calcsize(code)}x"
                   for name, code in _VALUE_CODES)


def final_decoder(own: tuple[str, ...], other: tuple[str, ...], ipv4: bool) -> struct.Struct:
    """Decodes a FINAL record into only what is asked for (each value made costs: a final
    record is 56 fields, and ints and bytes are objects): has_reverse, netns, saddr, daddr
    (4 bytes each with ipv4, for a record of an IPv4 key), sport, dport, proto, then the
    `own` fields of the key's value and the `other` fields of the other direction's, each in
    struct flow_val's order."""
    address = "4s12x" if ipv4 else "16s"
    decoder = struct.Struct("<4xIQ" + address + address + "HHB3x" + _value_format(own)
                            + _value_format(other))
    if decoder.size != FINAL.size or struct.calcsize(_value_format(())) != FLOW_VAL.size:
        raise AssertionError("final_decoder out of step with struct final")
    return decoder


def decode_value(raw: bytes, offset: int = 0) -> FlowValue:
    return _make_value(FLOW_VAL.unpack_from(raw, offset))


# Addresses, ports and namespace cookies as the collector's per-flow state holds them: every
# flow of a host shares its local addresses and namespace, both directions of a connection its
# ports, many flows their peers' addresses and a server's port. One object each instead of one
# per flow and key part saved ~200 bytes a flow at 100k connections (bench.scale). Kept small
# (~1 MB): when full it starts over, which costs only some sharing, as the keys of one
# connection are read together; unbounded, client ports cycling under churn grew it for minutes.
_shared: dict = {}
SHARED_PARTS_MAX = 1 << 14


def _share(part):  # type: ignore[no-untyped-def]
    shared = _shared.get(part)
    if shared is None:
        if len(_shared) >= SHARED_PARTS_MAX:
            _shared.clear()
        shared = _shared[part] = part
    return shared


def key_parts(raw: bytes, offset: int = 0):
    """(netns cookie, saddr, daddr, sport, dport, proto, ipver, direction), addresses trimmed."""
    netns, saddr, daddr, sport, dport, proto, ipver, direction = FLOW_KEY.unpack_from(raw, offset)
    if ipver == 4:
        saddr, daddr = saddr[:4], daddr[:4]
    return (_share(netns), _share(saddr), _share(daddr), _share(sport), _share(dport), proto,
            ipver, direction)


DIRECTIONS = (Direction.INGRESS, Direction.EGRESS)


def flow_key(parts, netns_inode: int) -> FlowKey:
    _, saddr, daddr, sport, dport, proto, ipver, direction = parts
    return FlowKey(netns_inode, DIRECTIONS[direction], ipver, proto, saddr, daddr, sport, dport)


def key_of_conn(conn: ConnId, direction: int, netns_inode: int, raw: bytes) -> FlowKey:
    """The FlowKey of one direction of a connection, sharing the connection's parts (raw:
    the kernel key, unpacked again only for ICMP, whose type and code conn_of drops)."""
    _, proto, ipver, laddr, lport, raddr, rport = conn
    if proto in ICMP_PROTOCOLS:
        return flow_key(key_parts(raw), netns_inode)
    if direction == Direction.EGRESS:
        return FlowKey(netns_inode, DIRECTIONS[1], ipver, proto, laddr, raddr, lport, rport)
    return FlowKey(netns_inode, DIRECTIONS[0], ipver, proto, raddr, laddr, rport, lport)


def conn_of(parts) -> ConnId:
    """The local socket's view of a kernel flow key."""
    netns, saddr, daddr, sport, dport, proto, ipver, direction = parts
    if proto in ICMP_PROTOCOLS:
        sport = dport = 0
    if direction == Direction.EGRESS:
        return (netns, proto, ipver, saddr, sport, daddr, dport)
    return (netns, proto, ipver, daddr, dport, saddr, sport)


def kernel_keys_of(conn: ConnId) -> list[bytes]:
    """The kernel keys of a connection's two directions (TCP/UDP; ICMP needs a scan)."""
    netns, proto, ipver, laddr, lport, raddr, rport = conn
    return [
        FLOW_KEY.pack(netns, laddr, raddr, lport, rport, proto, ipver, Direction.EGRESS),
        FLOW_KEY.pack(netns, raddr, laddr, rport, lport, proto, ipver, Direction.INGRESS),
    ]


def twin_key(kraw: bytes) -> bytes:
    """The kernel key of the other direction of the same connection."""
    netns, saddr, daddr, sport, dport, proto, ipver, direction = FLOW_KEY.unpack(kraw)
    return FLOW_KEY.pack(netns, daddr, saddr, dport, sport, proto, ipver, 1 - direction)


def encode_key(key: FlowKey, netns_cookie: int) -> bytes:
    return FLOW_KEY.pack(
        netns_cookie, key.src_addr, key.dst_addr, key.src_port, key.dst_port,
        key.protocol, key.ip_version, key.direction,
    )


def unmap_v4(addr: bytes, family: int) -> tuple[bytes, int]:
    """(address, ip version) with IPv4-mapped IPv6 addresses turned into IPv4."""
    if family == socket.AF_INET:
        return addr[:4], 4
    if addr.startswith(V4_MAPPED_PREFIX):
        return addr[12:16], 4
    return addr, 6


class SockInfo(NamedTuple):
    netns: int
    process: ProcessInfo
    bound_port: int
    protocol: int
    origin: int


# (tgid, uid, cgroup id, comm as the kernel has it) -> its ProcessInfo; read directly where a
# call per flow counts (FlowEnds._finals), process_info otherwise.
PROCESSES: dict[tuple[int, int, int, bytes], ProcessInfo] = {}


def process_info(tgid: int, uid: int, cgroup_id: int, comm: bytes) -> ProcessInfo:
    # Thousands of sockets share a handful of processes: one ProcessInfo each.
    ident = (tgid, uid, cgroup_id, comm)
    process = PROCESSES.get(ident)
    if process is None:
        if len(PROCESSES) > 65536:
            PROCESSES.clear()
        name = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        process = PROCESSES[ident] = ProcessInfo(tgid, name, uid, cgroup_id)
    return process


def decode_sock_info(raw: bytes, offset: int = 0) -> SockInfo | None:
    netns, cgroup_id, tgid, uid, port, proto, origin, comm = SOCK_INFO.unpack_from(raw, offset)
    if not origin:
        return None
    return SockInfo(netns, process_info(tgid, uid, cgroup_id, comm), port, proto, origin)


def decode_retired(raw: bytes) -> tuple[bytes, FlowValue]:
    """(kernel key, final value) of an EV_FLOW_RETIRED record."""
    start = RETIRED_HEADER.size
    return raw[start : start + FLOW_KEY.size], decode_value(raw, start + FLOW_KEY.size)


def event_kind(raw: bytes) -> int:
    return RETIRED_HEADER.unpack_from(raw)[0]


class Event(NamedTuple):  # one per ended socket: a tuple is the cheapest to build
    kind: int
    old_state: int
    cookie: int
    netns: int
    conn: ConnId | None
    info: SockInfo | None


def decode_event(raw: bytes) -> Event:
    kind, old_state, cookie, netns, laddr, raddr, lport, rport, family, proto = (
        EVENT.unpack_from(raw, 0)
    )
    conn = None
    if kind == EV_TCP_CLOSE:
        local, ipver = unmap_v4(laddr, family)
        remote, _ = unmap_v4(raddr, family)
        conn = (netns, proto, ipver, local, lport, remote, rport)
    return Event(kind, old_state, cookie, netns, conn, decode_sock_info(raw, EVENT.size))
