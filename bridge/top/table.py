"""The live flow table behind `flowbridge top`: the latest observation of every flow.

Observations carry cumulative counters, so keeping the latest one per flow is the whole state.
Flows leave the table when the kernel says they ended (after `linger_ms`, so that a short
connection is still seen), when the agent's cache releases them, or when idle for `idle_ms`.
The agent's loop writes, the state socket's thread reads: one lock, held for dict operations
only, never while rows are built.

Writing is lazy: the agent tees every observation here, but top is rarely connected. An update
only queues its batch; a read applies what is queued. A batch older than `linger_ms` when it is
applied has had its ended flows expire already, so they leave the table without ever entering
it: under connection churn almost every observation is such an ended flow, and the table cost
the agent ~20% of its CPU when it stored each one and pruned it again (bench.churn).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import deque
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
        # Keys of ended flows in _flows, and when they ended (a subset of _flows' keys).
        self._ended_at: dict[FlowKey, int] = {}
        # What is not applied to _flows yet, oldest first: (when, observations, forgotten keys),
        # either a batch of observations or the keys of a forget().
        self._queued: deque[tuple[int, list[FlowObservation], list[FlowKey]]] = deque()
        self._queued_observations = 0  # kept under max_flows: the queue is bounded like _flows
        self._lock = threading.Lock()
        self.dropped = 0  # observations of new flows not kept because the table was full

    def __len__(self) -> int:
        with self._lock:
            self._apply_queued()
            return len(self._flows)

    def update(self, observations: list[FlowObservation], now_ms: int) -> None:
        """Queues the batch (kept as given: the caller must not change the list afterwards)."""
        with self._lock:
            self._queued.append((now_ms, observations, []))
            self._queued_observations += len(observations)
            while self._queued_observations > self.max_flows:
                self._apply_next(None)

    def forget(self, keys: Iterable[FlowKey]) -> None:
        with self._lock:
            if not self._queued:
                self._forget(keys)
            else:  # after the batches queued before it, not before
                keys = list(keys)
                if keys:
                    self._queued.append((self._queued[-1][0], [], keys))

    def _forget(self, keys: Iterable[FlowKey]) -> None:
        for key in keys:
            self._flows.pop(key, None)
            self._ended_at.pop(key, None)

    def _apply_queued(self, expired_before: int | None = None) -> None:
        """Applies what is queued, in order: all of it, or (expired_before) only batches that
        came before it, whose ended flows would have lingered out by now. Under the lock."""
        queued = self._queued
        while queued and (expired_before is None or queued[0][0] < expired_before):
            self._apply_next(expired_before)

    def _apply_next(self, expired_before: int | None) -> None:
        at, batch, forgotten = self._queued.popleft()
        self._queued_observations -= len(batch)
        if forgotten:
            self._forget(forgotten)
        elif expired_before is None:
            self._apply(batch, at)
        else:
            self._apply_expired(batch)

    def _apply(self, observations: list[FlowObservation], at_ms: int) -> None:
        none = EndCause.NONE
        flows, ended_at, limit = self._flows, self._ended_at, self.max_flows
        for obs in observations:
            key = obs.key
            if key not in flows and len(flows) >= limit:
                self.dropped += 1
                continue
            flows[key] = obs
            if obs.end is not none:
                # From its latest end: a key two connections ended under lingers for the second.
                ended_at[key] = at_ms
            elif key in ended_at:  # the key was reused by a new connection
                del ended_at[key]

    def _apply_expired(self, observations: list[FlowObservation]) -> None:
        """As _apply followed by the prune that drops its ended flows: they just leave."""
        none = EndCause.NONE
        flows, ended_at, limit = self._flows, self._ended_at, self.max_flows
        pop = flows.pop
        for obs in observations:
            key = obs.key
            if obs.end is not none:
                if pop(key, None) is not None:
                    ended_at.pop(key, None)  # ended_at's keys are in _flows
                continue
            if key not in flows and len(flows) >= limit:
                self.dropped += 1
                continue
            flows[key] = obs
            if key in ended_at:
                del ended_at[key]

    def prune(self, now_ms: int) -> list[FlowKey]:
        """Drops flows ended more than linger_ms ago and flows idle for idle_ms; returns the
        idle ones (a source of its own may then release their kernel state). Batches younger
        than linger_ms stay queued; a flow they hold a newer observation or forget() of is not
        idle. (So an observation whose last packet is older than idle_ms - linger_ms when it
        arrives is found idle up to linger_ms late; a source's observations are recent.)"""
        with self._lock:
            self._apply_queued(expired_before=now_ms - self.linger_ms + 1)
            gone = [k for k, at in self._ended_at.items() if now_ms - at >= self.linger_ms]
            for key in gone:
                del self._ended_at[key]
                self._flows.pop(key, None)
            idle_before = now_ms - self.idle_ms
            idle = [k for k, obs in self._flows.items()
                    if obs.last_ms < idle_before and k not in self._ended_at]
            if idle and self._queued:  # a queued observation or forget() of a flow comes later
                candidates = set(idle)
                later = {obs.key for _, batch, _ in self._queued for obs in batch
                         if obs.key in candidates}
                later.update(key for _, _, forgotten in self._queued for key in forgotten)
                idle = [k for k in idle if k not in later]
            for key in idle:
                del self._flows[key]
        return idle

    def observations(self) -> list[FlowObservation]:
        with self._lock:
            self._apply_queued()
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

    def poll(self, timeout_ms: int, *, final: bool = False) -> list[FlowObservation]:
        observations = self.source.poll(timeout_ms, final=final)  # type: ignore[attr-defined]
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
