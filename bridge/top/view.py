"""What `flowbridge top` shows, read on demand from a flow cache: no second table.

The agent's FlowCache already holds every live flow with what top shows of it (cumulative
counters, process, TCP state). Top used to keep a table of its own, fed with every observation:
~270 bytes a flow (the latest observation and its TCP state, kept alive for top alone, and a
dict slot) and ~1 ms of agent CPU per 1000 connections under churn. Now a read copies the
cache's flows, and the cache's owner does nothing per observation.

What the cache does not hold is a flow that has ended: it leaves the cache as an END_OF_FLOW
record (most short connections never enter it). Top still shows such a flow for `linger_ms`, so
that a short connection can be seen at all: the owner hands the view each batch of records that
left the cache (a reference to a list it built anyway) and the view keeps the batches of the last
`linger_ms`. Flows that leave as idle or evicted do not linger, as they did not in the table.
Batches are kept only while someone watches (a read in the last `WATCH_MS`; `watched`: from the
start, for an owner that reads the view itself):
kept records outlive the export and cost the garbage collector under connection churn (its
young-generation passes doubled in a same-run bench.churn A/B), for a top that is rarely there.

Threads: the cache's owner (the agent's loop) changes the cache and hands over records under
`lock`; a reader (the state socket's thread) takes the lock to copy the list of flows, then to
read their fields a chunk at a time, so the loop waits at most for one chunk.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bridge.cache import END_OF_FLOW, Export, Flow, FlowCache
from bridge.containers import CgroupResolver
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation

END_NAMES = {
    EndCause.NONE: "",
    EndCause.FIN: "fin",
    EndCause.RST_SENT: "rst_sent",
    EndCause.RST_RECEIVED: "rst_received",
    EndCause.CLOSED: "closed",
}
# Flows whose fields one read copies per hold of the lock: ~1-2 ms of the owner's time at most.
READ_CHUNK = 4096
# A reader that asked this recently is watching: ended flows are kept for its next reads. Far
# above any refresh interval of top, so a watching top always sees them.
WATCH_MS = 60_000


@dataclass(slots=True)
class FlowRow:
    """One direction of one flow as top shows it; also the state socket's JSON form (asdict)."""

    netns: int
    direction: str  # "out" (egress: src is local) or "in" (ingress: dst is local)
    protocol: int
    src: str
    dst: str
    sport: int
    dport: int
    octets: int  # cumulative, as the kernel counts them
    packets: int
    first_ms: int  # the first packet not exported yet: the flow's first until a record went out
    last_ms: int
    retrans: int = 0  # the local socket's retransmitted segments (both directions share it)
    srtt_us: int = 0
    tcp_state: int = 0
    end: str = ""
    pid: int = 0
    comm: str = ""
    uid: int = -1
    cgroup_id: int = 0
    container: str = ""  # runtime container id (64 hex digits), "" on the host
    pod: str = ""  # Kubernetes pod UID
    runtime: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> FlowRow:
        """Raises KeyError/TypeError/ValueError on a malformed object."""
        row = cls(**{name: obj[name] for name in _REQUIRED},
                  **{name: obj[name] for name in _OPTIONAL if name in obj})
        if row.direction not in ("in", "out"):
            raise ValueError(f"direction {row.direction!r}")
        for name in _INTS:
            if not isinstance(getattr(row, name), int):
                raise TypeError(f"{name} must be an integer")
        return row

    @property
    def local(self) -> tuple[str, int]:
        return (self.src, self.sport) if self.direction == "out" else (self.dst, self.dport)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.dst, self.dport) if self.direction == "out" else (self.src, self.sport)


_REQUIRED = ("netns", "direction", "protocol", "src", "dst", "sport", "dport", "octets",
             "packets", "first_ms", "last_ms")
_OPTIONAL = tuple(n for n in FlowRow.__slots__ if n not in _REQUIRED)  # type: ignore[attr-defined]
_INTS = ("netns", "protocol", "sport", "dport", "octets", "packets", "first_ms", "last_ms",
         "retrans", "srtt_us", "pid", "uid", "cgroup_id")

# What a row is made of, copied under the lock (a row itself is built outside it):
#   (key, octets, packets, first_ms, last_ms, retrans, srtt_us, tcp_state, end, process)
Facts = tuple


def facts_of_flow(flow: Flow) -> Facts:
    return (flow.key, flow.octets, flow.packets, flow.start_ms or flow.last_ms, flow.last_ms,
            flow.retrans, flow.srtt_us, flow.tcp_state, flow.end, flow.process)


def facts_of_observation(obs: FlowObservation) -> Facts:
    tcp = obs.tcp
    if tcp is None:
        return (obs.key, obs.octets, obs.packets, obs.first_ms, obs.last_ms, 0, 0, 0, obs.end,
                obs.process)
    return (obs.key, obs.octets, obs.packets, obs.first_ms, obs.last_ms, tcp.retrans_packets,
            tcp.srtt_us, tcp.state, obs.end, obs.process)


def facts_of(flow: Flow | FlowObservation) -> Facts:
    """A record's flow is a Flow, or the observation of a flow the cache never held."""
    return facts_of_flow(flow) if isinstance(flow, Flow) else facts_of_observation(flow)


@functools.lru_cache(maxsize=65_536)
def address_text(packed: bytes) -> str:
    """An address as text: IPv4 by inet_ntoa (the same text, 10x faster than ipaddress, which
    took ~40% of a read of 200k flows), each once while cached (flows share local addresses)."""
    if len(packed) == 4:
        return socket.inet_ntoa(packed)
    return str(ipaddress.ip_address(packed))


def row_of(facts: Facts, resolver: CgroupResolver | None) -> FlowRow:
    key, octets, packets, first_ms, last_ms, retrans, srtt_us, tcp_state, end, process = facts
    row = FlowRow(
        netns=key.netns,
        direction="out" if key.direction == Direction.EGRESS else "in",
        protocol=key.protocol,
        src=address_text(key.src_addr),
        dst=address_text(key.dst_addr),
        sport=key.src_port,
        dport=key.dst_port,
        octets=octets,
        packets=packets,
        first_ms=first_ms,
        last_ms=last_ms,
        retrans=retrans,
        srtt_us=srtt_us,
        tcp_state=tcp_state,
        end=END_NAMES.get(end, str(int(end))),
    )
    if process is not None:
        row.pid, row.comm, row.uid, row.cgroup_id = (
            process.pid, process.comm, process.uid, process.cgroup_id)
        info = resolver.container(process.cgroup_id) if resolver is not None else None
        if info is not None:
            row.container, row.pod, row.runtime = info.container_id, info.pod_uid, info.runtime
    return row


class CacheView:
    """Top's flows: the live flows of `cache`, and those that ended in the last `linger_ms`."""

    def __init__(
        self,
        cache: FlowCache,
        lock: threading.Lock,
        *,
        linger_ms: int = 3_000,
        resolver: CgroupResolver | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        watched: bool = False,
    ) -> None:
        self.cache = cache
        self.lock = lock
        self.linger_ms = linger_ms
        self.resolver = resolver
        self._clock_ms = clock_ms
        # Batches of records that left the cache, oldest first: (when, records).
        self._left: deque[tuple[int, list[Export]]] = deque()
        self._read_at: int | None = clock_ms() if watched else None  # the latest read

    def records_left(self, records: list[Export], now_ms: int) -> None:
        """The owner's hand-over, under `lock`: records that left the cache at `now_ms` (the
        list is kept as given: the owner must not change it afterwards)."""
        left = self._left
        if self._read_at is None or now_ms - self._read_at > WATCH_MS:
            left.clear()  # nobody watches: keep nothing
            return
        if records:
            left.append((now_ms, records))
        expired_at = now_ms - self.linger_ms
        while left and left[0][0] <= expired_at:
            left.popleft()

    def facts(self) -> list[Facts]:
        """Every flow's facts, each key once: a live flow over an ended one of the same key
        (the key was reused by a new connection), a later end over an earlier one."""
        now_ms = self._clock_ms()
        expired_at = now_ms - self.linger_ms
        with self.lock:
            self._read_at = now_ms
            batches = [records for at, records in self._left if at > expired_at]
            flows = self.cache.flows()
        by_key: dict[FlowKey, Facts] = {}
        # Flows out of the cache are never changed again: read without the lock.
        for records in batches:
            for record in records:
                if record[5] != END_OF_FLOW:
                    continue
                by_key[record[0].key] = facts_of(record[0])
                peer = record[8]
                if peer is not None:
                    by_key[peer[0].key] = facts_of(peer[0])
        for start in range(0, len(flows), READ_CHUNK):
            with self.lock:
                chunk = [facts_of_flow(flow) for flow in flows[start:start + READ_CHUNK]]
            for facts in chunk:
                by_key[facts[0]] = facts
        return list(by_key.values())

    def __len__(self) -> int:
        return len(self.facts())

    def rows(self) -> list[FlowRow]:
        resolver = self.resolver
        return [row_of(facts, resolver) for facts in self.facts()]
