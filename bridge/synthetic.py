"""Observation sources that are not the kernel: fed by tests, or replayed from JSON lines.

`flowbridge run --source replay:FILE` uses ReplaySource so the agent can be tested as a process
without BPF. One observation per line:

    {"direction": "egress", "protocol": 6, "src": "10.0.0.1", "dst": "10.0.0.2",
     "sport": 40000, "dport": 80, "octets": 1500, "packets": 3, "tcp_flags": 18,
     "first_ms": -2000, "last_ms": -1000, "after_ms": 0, "end": "fin",
     "ifindex": 2, "netns": 0,
     "process": {"pid": 1, "comm": "curl", "uid": 0, "cgroup_id": 1},
     "tcp": {"retrans_packets": 0, "retrans_bytes": 0, "srtt_us": 200, "min_rtt_us": 150,
             "snd_cwnd": 10, "state": 1}}

Times <= 0 are relative to when the file was loaded; `after_ms` delays the observation (counters
are cumulative, so a later line for the same flow with larger counters is traffic that went on).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterable

from bridge.errors import UserError
from ebpf.observation import (
    Direction,
    EndCause,
    FlowKey,
    FlowObservation,
    ProcessInfo,
    SourceStats,
    TcpHealth,
)

_ENDS = {
    "": EndCause.NONE,
    "none": EndCause.NONE,
    "fin": EndCause.FIN,
    "rst_sent": EndCause.RST_SENT,
    "rst_received": EndCause.RST_RECEIVED,
    "closed": EndCause.CLOSED,
}


class SyntheticSource:
    """An ObservationSource the caller feeds. Never blocks: tests drive time themselves."""

    def __init__(self, map_capacity: int = 65536) -> None:
        self._pending: list[FlowObservation] = []
        self.released: list[FlowKey] = []
        self.closed = False
        self.polls = 0
        self.map_capacity = map_capacity
        self.events_lost = 0
        self.map_full_drops = 0

    def feed(self, observations: Iterable[FlowObservation]) -> None:
        self._pending.extend(observations)

    def poll(self, timeout_ms: int, *, final: bool = False) -> list[FlowObservation]:
        self.polls += 1
        pending, self._pending = self._pending, []
        return pending

    def release(self, keys: list[FlowKey]) -> None:
        self.released.extend(keys)

    def stats(self) -> SourceStats:
        return SourceStats(
            flows_in_map=len(self._pending),
            map_capacity=self.map_capacity,
            map_full_drops=self.map_full_drops,
            events_lost=self.events_lost,
            extra={},
        )

    def close(self) -> None:
        self.closed = True


class ReplaySource(SyntheticSource):
    """Observations from a JSON-lines file, each delivered once its `after_ms` has passed."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        loaded_ms = int(clock() * 1000)
        self._schedule: list[tuple[int, FlowObservation]] = []
        try:
            lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115
        except OSError as exc:
            raise UserError(f"--source replay:{path}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
                due = loaded_ms + int(obj.get("after_ms", 0))
                self._schedule.append((due, observation_from_json(obj, loaded_ms)))
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path}:{number}: bad observation: {exc}") from None
        self._schedule.sort(key=lambda item: item[0])

    def poll(self, timeout_ms: int, *, final: bool = False) -> list[FlowObservation]:
        now_ms = int(self._clock() * 1000)
        due = [obs for at, obs in self._schedule if at <= now_ms]
        self._schedule = [(at, obs) for at, obs in self._schedule if at > now_ms]
        if not due and timeout_ms > 0:
            # Behave like the kernel source: wait for something to happen, a little.
            wait_ms = timeout_ms
            if self._schedule:
                wait_ms = min(wait_ms, max(0, self._schedule[0][0] - now_ms))
            time.sleep(wait_ms / 1000)
        self.polls += 1
        return due


def observation_from_json(obj: dict, now_ms: int) -> FlowObservation:
    src = ipaddress.ip_address(obj["src"])
    dst = ipaddress.ip_address(obj["dst"])
    if src.version != dst.version:
        raise ValueError("src and dst are of different address families")
    direction = obj.get("direction", "egress")
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction {direction!r}: expected ingress or egress")
    end = str(obj.get("end", "")).lower()
    if end not in _ENDS:
        raise ValueError(f"end {end!r}: expected one of {', '.join(e for e in _ENDS if e)}")

    def when(name: str) -> int:
        value = int(obj.get(name, 0))
        return now_ms + value if value <= 0 else value

    process = obj.get("process")
    tcp = obj.get("tcp")
    return FlowObservation(
        key=FlowKey(
            netns=int(obj.get("netns", 0)),
            direction=Direction.EGRESS if direction == "egress" else Direction.INGRESS,
            ip_version=src.version,
            protocol=int(obj.get("protocol", 6)),
            src_addr=src.packed,
            dst_addr=dst.packed,
            src_port=int(obj.get("sport", 0)),
            dst_port=int(obj.get("dport", 0)),
        ),
        ifindex=int(obj.get("ifindex", 1)),
        octets=int(obj["octets"]),
        packets=int(obj["packets"]),
        tcp_flags=int(obj.get("tcp_flags", 0)),
        first_ms=when("first_ms"),
        last_ms=when("last_ms"),
        socket_cookie=int(obj.get("cookie", 0)),
        process=ProcessInfo(**process) if process else None,
        tcp=TcpHealth(**tcp) if tcp else None,
        end=_ENDS[end],
    )
