"""The flow cache: turns cumulative kernel observations into NetFlow-style flow records.

Each direction of each flow is one `Flow` entry keyed by its FlowKey. Observations carry cumulative
counters; an entry remembers what it has already exported (its base) so every record carries a
delta and the records of one flow add up exactly to the kernel's total, whatever the timeouts.

Expiry never scans the whole cache:
- idle order: an OrderedDict in order of last activity; the sweep stops at the first live entry;
- active timeout: two parallel deques, flows and their period starts, appended as periods start;
  stale items (flow gone, period already exported) are skipped when they reach the front.

Memory per flow is the agent's scaling cost (bench.scale): two deques of references instead of
one deque of (deadline, flow, start) tuples save ~90 bytes per flow. (A plain dict re-inserting
active entries would drop the OrderedDict's list nodes, but holds deleted slots until it resizes:
no smaller at 200k flows, and finding the oldest entry to evict would scan them.)

With `biflow`, the two directions of a connection are still two entries, but they expire together
and leave the cache as one pair, which bridge.records turns into one RFC 5103 record.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from enum import IntEnum

from ebpf.observation import EndCause, FlowKey, FlowObservation


class EndReason(IntEnum):
    """IANA flowEndReason (136)."""

    IDLE_TIMEOUT = 1
    ACTIVE_TIMEOUT = 2
    END_OF_FLOW = 3
    FORCED_END = 4
    LACK_OF_RESOURCES = 5


# Plain ints on the hot path: Enum member access and hashing run Python code in 3.11.
IDLE_TIMEOUT, ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, LACK_OF_RESOURCES = (
    int(r) for r in EndReason
)
_NONE = EndCause.NONE


class Flow:
    """One direction of one flow. Cumulative counters as last observed, and the base: how much
    of them earlier records already carried."""

    __slots__ = (
        "key",  # also the cache's key: a tuple, hashed in C, shared with the source
        "ifindex",
        "octets",
        "packets",
        "base_octets",
        "base_packets",
        "retrans",
        "retrans_bytes",
        "base_retrans",
        "base_retrans_bytes",
        "tcp_flags",
        "start_ms",  # first packet of the current (unexported) period; 0 = nothing unexported
        "last_ms",
        "process",
        "srtt_us",  # of the latest TcpHealth, all records read of it beyond retransmissions
        "tcp_state",  # of the latest TcpHealth, for `flowbridge top` (bridge/top/view.py)
        "local_initiated",  # as FlowObservation.local_initiated: who connected, when known
        "end",
    )

    def __init__(self, obs: FlowObservation) -> None:
        self.key = obs.key
        self.ifindex = obs.ifindex
        self.octets = 0
        self.packets = 0
        self.base_octets = 0
        self.base_packets = 0
        self.retrans = 0
        self.retrans_bytes = 0
        self.base_retrans = 0
        self.base_retrans_bytes = 0
        self.tcp_flags = 0
        self.start_ms = 0
        self.last_ms = obs.last_ms
        self.process = None
        self.srtt_us = 0
        self.tcp_state = 0
        self.local_initiated = None
        self.end = _NONE

    @property
    def tcp(self) -> Flow | None:
        """What records read of the TCP state (`tcp.srtt_us`, when there is one), answered by
        the flow itself: holding the kernel's whole TcpHealth cost 112 bytes a flow."""
        return self if self.srtt_us else None


# What leaves the cache: a plain tuple, as this is the hot path.
#   (flow, octets, packets, start_ms, end_ms, reason, retrans_packets, retrans_bytes, peer)
# Counts are this record's deltas; `peer` is the reverse direction's tuple (biflow) or None.
# `flow` is a Flow, or a FlowObservation for a flow seen only at its end: both have key,
# ifindex, tcp_flags, process, tcp (None, or with srtt_us) and local_initiated, which is all
# that records read.
Export = tuple


def _reverse(key: FlowKey) -> tuple:
    """The reverse direction's cache key: a plain tuple hashes and compares as the FlowKey does
    and is cheaper to build."""
    return (key[0], 1 - key[1], key[2], key[3], key[5], key[4], key[7], key[6])


class FlowCache:
    def __init__(
        self,
        *,
        active_timeout: float = 60.0,
        idle_timeout: float = 15.0,
        max_flows: int = 100_000,
        biflow: bool = False,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.active_ms = int(active_timeout * 1000)
        self.idle_ms = int(idle_timeout * 1000)
        self.max_flows = max_flows
        self.biflow = biflow
        # One ordered dict is both the index and the idle order (least recently active first).
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        # Active timeout: period starts in the order periods began, and their flows. The deadline
        # is start + active_ms at sweep time, so a reload's new timeout applies at once.
        self._active_flows: deque[Flow] = deque()
        self._active_starts: deque[int] = deque()
        # biflow: counters of a direction that left with its ended peer before its own last
        # observation arrived: key -> (octets, packets, retrans, retrans_bytes, forget_at_ms)
        self._tombstones: dict[tuple, tuple[int, int, int, int, int]] = {}
        self._released: list[FlowKey] = []
        # Indexed by flowEndReason; a list, since Enum hashing runs in Python.
        self.records_by_reason = [0] * (max(EndReason) + 1)
        self.evictions = 0
        self.counter_resets = 0

    def set_timeouts(self, active_timeout: float, idle_timeout: float) -> None:
        """New timeouts apply from the next period / sweep; no flow state is lost."""
        self.active_ms = int(active_timeout * 1000)
        self.idle_ms = int(idle_timeout * 1000)

    def __len__(self) -> int:
        return len(self._flows)

    def flow_keys(self) -> Iterator[FlowKey]:
        """The key of every flow held."""
        return (flow.key for flow in self._flows.values())

    def flows(self) -> list[Flow]:
        """Every flow held, in a new list the caller may keep."""
        return list(self._flows.values())

    def take_released(self) -> list[FlowKey]:
        """Keys the cache dropped on its own (idle, eviction): the source may free their state."""
        released, self._released = self._released, []
        return released

    # -- observations -------------------------------------------------------------------------

    def update(self, observations: Iterable[FlowObservation]) -> list[Export]:
        """Applies observations; returns the records of flows that ended or were evicted."""
        out: list[Export] = []
        flows = self._flows
        get = flows.get
        move_to_end = flows.move_to_end
        active_flow = self._active_flows.append
        active_start = self._active_starts.append
        uniflow = not self.biflow
        ended: list[Flow] = []
        none, end_of_flow = _NONE, END_OF_FLOW  # locals: read for every observation
        evicted = 0  # records in `out` that evictions made; the others are flows seen ending
        for obs in observations:
            key = obs.key
            flow = get(key)
            if flow is None:
                if uniflow and obs.end is not none:
                    # A flow the cache never held, already over (most short flows): one record,
                    # no entry; the observation stands in for the Flow (it has what records
                    # read). Inline, as this is the commonest case at high flow rates.
                    if obs.packets or obs.octets:
                        tcp = obs.tcp
                        out.append(
                            (
                                obs,
                                obs.octets,
                                obs.packets,
                                obs.first_ms,
                                obs.last_ms,
                                end_of_flow,
                                tcp.retrans_packets if tcp is not None else 0,
                                tcp.retrans_bytes if tcp is not None else 0,
                                None,
                            )
                        )
                    continue
                if len(flows) >= self.max_flows:
                    before = len(out)
                    self._evict(out)
                    evicted += len(out) - before
                flow = Flow(obs)
                if self._tombstones:
                    self._restore_base(flow)
                flows[key] = flow
            packets = obs.packets
            if packets < flow.packets or obs.octets < flow.octets:
                self._counter_reset(flow)
            if packets != flow.packets:
                if not flow.start_ms:
                    flow.start_ms = self._period_start(flow, obs)
                    active_flow(flow)
                    active_start(flow.start_ms)
                flow.packets = packets
                flow.octets = obs.octets
                flow.last_ms = obs.last_ms
                move_to_end(key)
            flow.tcp_flags |= obs.tcp_flags
            if obs.ifindex:
                flow.ifindex = obs.ifindex
            if obs.process is not None:
                flow.process = obs.process
            if obs.local_initiated is not None:
                flow.local_initiated = obs.local_initiated
            tcp = obs.tcp
            if tcp is not None:
                if tcp.retrans_packets < flow.retrans:
                    flow.base_retrans -= flow.retrans
                    flow.base_retrans_bytes -= flow.retrans_bytes
                flow.srtt_us = tcp.srtt_us
                flow.tcp_state = tcp.state
                flow.retrans = tcp.retrans_packets
                flow.retrans_bytes = tcp.retrans_bytes
            if obs.end is not none:
                flow.end = obs.end
                ended.append(flow)
        self.records_by_reason[END_OF_FLOW] += len(out) - evicted
        for flow in ended:
            if get(flow.key) is flow:
                self._finish(flow, END_OF_FLOW, out, release=False)
        return out

    @staticmethod
    def _period_start(flow: Flow, obs: FlowObservation) -> int:
        if not flow.base_packets and not flow.packets:
            return obs.first_ms  # the flow's very first record
        # A continuation after an active-timeout export: the new packets came after the previous
        # record's last packet; with one new packet its time is exact.
        if obs.packets - flow.packets == 1:
            return obs.last_ms
        return max(flow.last_ms, obs.first_ms)

    def _counter_reset(self, flow: Flow) -> None:
        """The kernel restarted this flow's counters (its entry was recreated): what was observed
        but not exported stays owed, and the new counts add to it."""
        self.counter_resets += 1
        flow.base_octets -= flow.octets
        flow.base_packets -= flow.packets
        flow.octets = 0
        flow.packets = 0

    def _restore_base(self, flow: Flow) -> None:
        stone = self._tombstones.pop(flow.key, None)
        if stone is not None:
            flow.octets = flow.base_octets = stone[0]
            flow.packets = flow.base_packets = stone[1]
            flow.retrans = flow.base_retrans = stone[2]
            flow.retrans_bytes = flow.base_retrans_bytes = stone[3]

    # -- expiry -------------------------------------------------------------------------------

    def sweep(self, now_ms: int) -> list[Export]:
        """Active and idle timeouts as of `now_ms` (Unix epoch milliseconds)."""
        out: list[Export] = []
        flows = self._flows
        starts = self._active_starts
        active_flows = self._active_flows
        started_before = now_ms - self.active_ms
        limit = now_ms - self.idle_ms
        # A flow whose period is over but which is idle too ends by the idle timeout below:
        # flowEndReason "active timeout" says the flow was still active (RFC 5102), and an
        # active record followed by an empty idle end would report one packet as active.
        idle_and_due: list[Flow] = []
        while starts and starts[0] <= started_before:
            start_ms = starts.popleft()
            flow = active_flows.popleft()
            if flow.start_ms == start_ms and flows.get(flow.key) is flow:
                if flow.last_ms <= limit:
                    idle_and_due.append(flow)
                else:
                    self._emit(flow, ACTIVE_TIMEOUT, out)
        expired: list[Flow] = []
        for flow in flows.values():
            if flow.last_ms > limit:
                break
            expired.append(flow)
        for flow in expired:
            if flows.get(flow.key) is not flow:
                continue  # left already, with its peer
            if self.biflow:
                peer = flows.get(_reverse(flow.key))
                if peer is not None and peer.last_ms > limit:
                    flows.move_to_end(flow.key)  # the connection is not idle yet
                    continue
            self._finish(flow, IDLE_TIMEOUT, out, release=True)
        for flow in idle_and_due:  # kept (biflow: its peer is active): its period is over
            if flows.get(flow.key) is flow and flow.start_ms:
                self._emit(flow, ACTIVE_TIMEOUT, out)
        if self._tombstones:
            self._tombstones = {k: v for k, v in self._tombstones.items() if v[4] > now_ms}
        return out

    def flush_all(self) -> list[Export]:
        """Forced end (shutdown): every flow with unexported traffic, now."""
        out: list[Export] = []
        for flow in list(self._flows.values()):
            if self._flows.get(flow.key) is flow:
                self._finish(flow, FORCED_END, out, release=False)
        return out

    def _evict(self, out: list[Export]) -> None:
        """Lack of resources: the least recently active flow makes room."""
        oldest = next(iter(self._flows.values()))
        self.evictions += 1
        self._finish(oldest, LACK_OF_RESOURCES, out, release=True)

    def _finish(self, flow: Flow, reason: int, out: list[Export], release: bool) -> None:
        """Exports what is left of `flow` (and its peer, biflow) and removes it from the cache."""
        peer = self._flows.get(_reverse(flow.key)) if self.biflow else None
        self._remove(flow, release)
        if peer is None:
            self._emit(flow, reason, out)
            return
        self._remove(peer, release)
        if not release and peer.end is _NONE:
            # The peer's own final observation may still come: remember what was exported.
            self._tombstones[peer.key] = (
                peer.octets,
                peer.packets,
                peer.retrans,
                peer.retrans_bytes,
                flow.last_ms + self.idle_ms,
            )
        self._emit(flow, reason, out, peer)

    def _remove(self, flow: Flow, release: bool) -> None:
        del self._flows[flow.key]
        if release:
            self._released.append(flow.key)

    def _emit(self, flow: Flow, reason: int, out: list[Export], peer: Flow | None = None) -> None:
        if self.biflow and peer is None and reason == ACTIVE_TIMEOUT:
            peer = self._flows.get(_reverse(flow.key))
        record = self._take(flow, reason)
        peer_record = self._take(peer, reason) if peer is not None else None
        if record is None:
            record, peer_record = peer_record, None
        if record is not None:
            out.append(record + (peer_record,))
            self.records_by_reason[reason] += 1

    @staticmethod
    def _take(flow: Flow, reason: int) -> tuple | None:
        """This flow's unexported delta as a record tuple (without peer); the base moves up."""
        packets = flow.packets - flow.base_packets
        if packets <= 0 and flow.octets == flow.base_octets:
            return None
        octets = flow.octets - flow.base_octets
        retrans = flow.retrans - flow.base_retrans
        retrans_bytes = flow.retrans_bytes - flow.base_retrans_bytes
        start_ms = flow.start_ms or flow.last_ms
        flow.base_octets = flow.octets
        flow.base_packets = flow.packets
        flow.base_retrans = flow.retrans
        flow.base_retrans_bytes = flow.retrans_bytes
        flow.start_ms = 0
        return (flow, octets, packets, start_ms, flow.last_ms, reason, retrans, retrans_bytes)
