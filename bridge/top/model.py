"""What `flowbridge top` shows, computed from flow rows: pure functions, no terminal.

A *connection* is one local socket's conversation with one remote endpoint: the outgoing and
the incoming direction of a flow joined (a loopback connection is two connections, one per
local end, as both ends are local sockets). Rates come from the difference between two
successive frames. Retransmissions and RTT belong to the socket, which both directions share,
so they are taken, never added, across the two directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge.top.view import FlowRow

VIEWS = ("flows", "processes", "hosts")
SORTS = ("bytes", "rate", "retrans", "rtt", "packets")

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
TCP_STATES = {
    1: "ESTAB", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "SYN_RECV",
}

ConnKey = tuple  # (netns, protocol, local addr, local port, remote addr, remote port)


@dataclass
class Connection:
    key: ConnKey
    protocol: int
    local: tuple[str, int]
    remote: tuple[str, int]
    bytes_out: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    packets_in: int = 0
    rate: float = 0.0  # bytes per second, both directions, since the previous frame
    retrans: int = 0
    srtt_us: int = 0
    tcp_state: int = 0
    end: str = ""
    last_ms: int = 0
    pid: int = 0
    comm: str = ""
    uid: int = -1
    container: str = ""
    pod: str = ""

    @property
    def total_bytes(self) -> int:
        return self.bytes_out + self.bytes_in

    @property
    def total_packets(self) -> int:
        return self.packets_out + self.packets_in

    @property
    def process_label(self) -> str:
        return f"{self.comm}[{self.pid}]" if self.pid else "?"


@dataclass
class Group:
    """Connections summed by process or by remote host."""

    label: str
    connections: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    packets: int = 0
    rate: float = 0.0
    retrans: int = 0
    srtt_us: int = 0  # the worst (largest) smoothed RTT among the group's connections
    container: str = ""
    pod: str = ""
    members: set[str] = field(default_factory=set)  # hosts of a process, processes of a host

    @property
    def total_bytes(self) -> int:
        return self.bytes_out + self.bytes_in

    @property
    def total_packets(self) -> int:
        return self.packets


def connection_key(row: FlowRow) -> ConnKey:
    local, remote = row.local, row.remote
    return (row.netns, row.protocol, local[0], local[1], remote[0], remote[1])


def connections(rows: Iterable[FlowRow]) -> dict[ConnKey, Connection]:
    out: dict[ConnKey, Connection] = {}
    for row in rows:
        key = connection_key(row)
        conn = out.get(key)
        if conn is None:
            conn = out[key] = Connection(key, row.protocol, row.local, row.remote)
        if row.direction == "out":
            conn.bytes_out += row.octets
            conn.packets_out += row.packets
        else:
            conn.bytes_in += row.octets
            conn.packets_in += row.packets
        conn.retrans = max(conn.retrans, row.retrans)
        if row.srtt_us:
            conn.srtt_us = row.srtt_us
        if row.tcp_state:
            conn.tcp_state = row.tcp_state
        if row.end:
            conn.end = row.end
        conn.last_ms = max(conn.last_ms, row.last_ms)
        if row.pid and not conn.pid:
            conn.pid, conn.comm, conn.uid = row.pid, row.comm, row.uid
        if row.container and not conn.container:
            conn.container = row.container
        if row.pod and not conn.pod:
            conn.pod = row.pod
    return out


class RateMeter:
    """Bytes per second of each connection between two successive frames."""

    def __init__(self) -> None:
        self._previous: dict[ConnKey, int] = {}
        self._previous_ms: int | None = None

    def apply(self, conns: dict[ConnKey, Connection], now_ms: int) -> None:
        previous, then = self._previous, self._previous_ms
        if then is not None and now_ms > then:
            seconds = (now_ms - then) / 1000
            for key, conn in conns.items():
                before = previous.get(key)
                if before is None:
                    # New since the last frame: everything it carried, unless it is older than
                    # that frame (top just started, or it came back after an idle release).
                    before = 0 if conn.last_ms >= then else conn.total_bytes
                conn.rate = max(0, conn.total_bytes - before) / seconds
        self._previous = {key: conn.total_bytes for key, conn in conns.items()}
        self._previous_ms = now_ms


def _group(conns: Iterable[Connection], label_of: Callable[[Connection], str],
           member_of: Callable[[Connection], str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for conn in conns:
        label = label_of(conn)
        group = groups.get(label)
        if group is None:
            group = groups[label] = Group(label, container=conn.container, pod=conn.pod)
        group.connections += 1
        group.bytes_out += conn.bytes_out
        group.bytes_in += conn.bytes_in
        group.packets += conn.total_packets
        group.rate += conn.rate
        group.retrans += conn.retrans
        group.srtt_us = max(group.srtt_us, conn.srtt_us)
        group.members.add(member_of(conn))
    return list(groups.values())


def by_process(conns: Iterable[Connection]) -> list[Group]:
    return _group(conns, lambda c: c.process_label, lambda c: c.remote[0])


def by_host(conns: Iterable[Connection]) -> list[Group]:
    return _group(conns, lambda c: c.remote[0], lambda c: c.comm or "?")


_SORT_KEYS: dict[str, Callable] = {
    "bytes": lambda item: item.total_bytes,
    "rate": lambda item: item.rate,
    "retrans": lambda item: item.retrans,
    "rtt": lambda item: item.srtt_us,
    "packets": lambda item: item.total_packets,
}


def ranked(items: Iterable, sort: str, limit: int | None = None) -> list:
    """Largest first; ties broken by bytes then by label, so a frame never reshuffles at
    random."""
    if sort not in _SORT_KEYS:
        raise ValueError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
    primary = _SORT_KEYS[sort]
    tie = _SORT_KEYS["bytes"]

    def order(item):  # type: ignore[no-untyped-def]
        label = item.label if isinstance(item, Group) else str(item.key)
        return (-primary(item), -tie(item), label)

    result = sorted(items, key=order)
    return result[:limit] if limit is not None else result


@dataclass
class Frame:
    """One screenful: the chosen view's rows and the totals of the header."""

    view: str
    sort: str
    rows: list
    connections: int
    processes: int
    hosts: int
    bytes_total: int
    rate_total: float
    retrans_total: int
    time_ms: int
    origin: str  # where the flows come from: "agent pid N via PATH" or "own eBPF collector"
    notes: list[str] = field(default_factory=list)  # kernel-side losses, table drops


def build_frame(conns: dict[ConnKey, Connection], view: str, sort: str, time_ms: int,
                origin: str, limit: int | None = None, notes: list[str] | None = None) -> Frame:
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: expected one of {', '.join(VIEWS)}")
    items = list(conns.values())
    processes = by_process(items)
    hosts = by_host(items)
    chosen = {"flows": items, "processes": processes, "hosts": hosts}[view]
    return Frame(
        view=view,
        sort=sort,
        rows=ranked(chosen, sort, limit),
        connections=len(items),
        processes=len(processes),
        hosts=len(hosts),
        bytes_total=sum(c.total_bytes for c in items),
        rate_total=sum(c.rate for c in items),
        retrans_total=sum(c.retrans for c in items),
        time_ms=time_ms,
        origin=origin,
        notes=list(notes or []),
    )
