"""The live flow table behind `flowbridge top`: the latest observation of every flow.

Observations carry cumulative counters, so keeping the latest one per flow is the whole state.
Flows leave the table when the kernel says they ended (after `linger_ms`, so that a short
connection is still seen), when the agent's cache releases them, or when idle for `idle_ms`.
The agent's loop writes, the state socket's thread reads: one lock, held for dict operations
only, never while rows are built.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from bridge.containers import CgroupResolver
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation

END_NAMES = {
    EndCause.NONE: "",
    EndCause.FIN: "fin",
    EndCause.RST_SENT: "rst_sent",
    EndCause.RST_RECEIVED: "rst_received",
    EndCause.CLOSED: "closed",
}


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
    octets: int
    packets: int
    first_ms: int
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


def row_of(obs: FlowObservation, resolver: CgroupResolver | None) -> FlowRow:
    key = obs.key
    row = FlowRow(
        netns=key.netns,
        direction="out" if key.direction == Direction.EGRESS else "in",
        protocol=key.protocol,
        src=str(ipaddress.ip_address(key.src_addr)),
        dst=str(ipaddress.ip_address(key.dst_addr)),
        sport=key.src_port,
        dport=key.dst_port,
        octets=obs.octets,
        packets=obs.packets,
        first_ms=obs.first_ms,
        last_ms=obs.last_ms,
        end=END_NAMES.get(obs.end, str(int(obs.end))),
    )
    if obs.tcp is not None:
        row.retrans = obs.tcp.retrans_packets
        row.srtt_us = obs.tcp.srtt_us
        row.tcp_state = obs.tcp.state
    process = obs.process
    if process is not None:
        row.pid, row.comm, row.uid, row.cgroup_id = (
            process.pid, process.comm, process.uid, process.cgroup_id)
        info = resolver.container(process.cgroup_id) if resolver is not None else None
        if info is not None:
            row.container, row.pod, row.runtime = info.container_id, info.pod_uid, info.runtime
    return row


class FlowTable:
    def __init__(
        self,
        *,
        idle_ms: int = 15_000,
        linger_ms: int = 3_000,
        max_flows: int = 200_000,
        resolver: CgroupResolver | None = None,
    ) -> None:
        self.idle_ms = idle_ms
        self.linger_ms = linger_ms
        self.max_flows = max_flows
        self.resolver = resolver
        self._flows: dict[FlowKey, FlowObservation] = {}
        self._ended_at: dict[FlowKey, int] = {}
        self._lock = threading.Lock()
        self.dropped = 0  # observations of new flows not kept because the table was full

    def __len__(self) -> int:
        return len(self._flows)

    def update(self, observations: Iterable[FlowObservation], now_ms: int) -> None:
        none = EndCause.NONE
        with self._lock:
            flows, ended_at, limit = self._flows, self._ended_at, self.max_flows
            for obs in observations:
                key = obs.key
                if key not in flows and len(flows) >= limit:
                    self.dropped += 1
                    continue
                flows[key] = obs
                if obs.end is not none:
                    ended_at.setdefault(key, now_ms)
                elif key in ended_at:  # the key was reused by a new connection
                    del ended_at[key]

    def forget(self, keys: Iterable[FlowKey]) -> None:
        with self._lock:
            for key in keys:
                self._flows.pop(key, None)
                self._ended_at.pop(key, None)

    def prune(self, now_ms: int) -> list[FlowKey]:
        """Drops flows ended more than linger_ms ago and flows idle for idle_ms; returns the
        idle ones (a source of its own may then release their kernel state)."""
        with self._lock:
            gone = [k for k, at in self._ended_at.items() if now_ms - at >= self.linger_ms]
            for key in gone:
                del self._ended_at[key]
                self._flows.pop(key, None)
            idle_before = now_ms - self.idle_ms
            idle = [k for k, obs in self._flows.items()
                    if obs.last_ms < idle_before and k not in self._ended_at]
            for key in idle:
                del self._flows[key]
        return idle

    def observations(self) -> list[FlowObservation]:
        with self._lock:
            return list(self._flows.values())

    def rows(self) -> list[FlowRow]:
        resolver = self.resolver
        return [row_of(obs, resolver) for obs in self.observations()]


class TeeSource:
    """Wraps the agent's ObservationSource: every observation also goes into a FlowTable, and
    every release takes the flow out of it. Anything else (exclude_socket, stats, ...) is the
    wrapped source's own."""

    def __init__(self, source: object, table: FlowTable,
                 clock_ms: Callable[[], int]) -> None:
        self.source = source
        self.table = table
        self._clock_ms = clock_ms
        self._next_prune = 0

    def poll(self, timeout_ms: int) -> list[FlowObservation]:
        observations = self.source.poll(timeout_ms)  # type: ignore[attr-defined]
        now_ms = self._clock_ms()
        if observations:
            self.table.update(observations, now_ms)
        if now_ms >= self._next_prune:
            self._next_prune = now_ms + 1000
            self.table.prune(now_ms)
        return observations

    def release(self, keys: list[FlowKey]) -> None:
        self.table.forget(keys)
        self.source.release(keys)  # type: ignore[attr-defined]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.source, name)
