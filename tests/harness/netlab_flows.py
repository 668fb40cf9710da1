"""Comparing what an ObservationSource reported with what the lab's capture saw.

FlowBook polls a source in a background thread (end-of-flow events must be drained while traffic
runs) and keeps the latest observation per FlowKey; counters are cumulative, so the latest is the
total. `diff_flow` lists every disagreement with the capture as one readable line, so a failing
test says exactly which field of which flow differs and by how much.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation, ObservationSource
from tests.harness.netlab_capture import CaptureFlow, CaptureKey

TIME_TOLERANCE_MS = 5.0


class FlowBook:
    def __init__(self, source: ObservationSource, poll_timeout_ms: int = 50):
        self.source, self.poll_timeout_ms = source, poll_timeout_ms
        self.latest: dict[FlowKey, FlowObservation] = {}
        self.polls = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowbook", daemon=True)

    def start(self) -> FlowBook:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                observations = self.source.poll(self.poll_timeout_ms)
            except BaseException as exc:  # surfaced by wait(): a poll error must fail the test
                with self._changed:
                    self.error = exc
                    self._changed.notify_all()
                return
            with self._changed:
                self.polls += 1
                for observation in observations:
                    self.latest[observation.key] = observation
                self._changed.notify_all()

    def snapshot(self) -> dict[FlowKey, FlowObservation]:
        with self._lock:
            return dict(self.latest)

    def wait(self, done: Callable[[dict[FlowKey, FlowObservation]], bool],
             timeout_s: float = 5.0) -> dict[FlowKey, FlowObservation]:
        """Waits until `done(snapshot)` holds (or the timeout) and returns the last snapshot; the
        caller asserts on it, so a timeout shows up as a precise difference, not a hang."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self.error is not None:
                    raise RuntimeError(f"poll() failed: {self.error!r}") from self.error
                snapshot = dict(self.latest)
                remaining = deadline - time.monotonic()
                if done(snapshot) or remaining <= 0:
                    return snapshot
                self._changed.wait(min(remaining, 0.2))


@dataclass(frozen=True)
class FiveTuple:
    version: int
    protocol: int
    a_addr: str
    a_port: int
    b_addr: str
    b_port: int

    def matches(self, key: CaptureKey) -> bool:
        """Either direction of this flow (ICMP: the two addresses only)."""
        _, version, protocol, src, dst, sport, dport = key
        if version != self.version or protocol != self.protocol:
            return False
        a, b = _packed(self.a_addr), _packed(self.b_addr)
        if self.protocol in (1, 58):
            return {src, dst} == {a, b}
        return (src, dst, sport, dport) in ((a, b, self.a_port, self.b_port),
                                            (b, a, self.b_port, self.a_port))


def _packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def flow_key(netns: int, key: CaptureKey) -> FlowKey:
    direction, version, protocol, src, dst, sport, dport = key
    return FlowKey(netns, Direction(direction), version, protocol, src, dst, sport, dport)


def expected_flows(capture: dict[CaptureKey, CaptureFlow], netns: int, flow: FiveTuple,
                   ) -> dict[FlowKey, CaptureFlow]:
    """The capture's flows of one five-tuple, keyed as the collector must key them."""
    return {flow_key(netns, k): v for k, v in capture.items() if flow.matches(k)}


def diff_flow(key: FlowKey, observed: FlowObservation | None, truth: CaptureFlow,
              time_tolerance_ms: float = TIME_TOLERANCE_MS) -> list[str]:
    """Every disagreement between an observation and the capture, one line each."""
    name = describe(key)
    if observed is None:
        return [f"{name}: missing (capture: {truth.packets} packets, {truth.octets} bytes)"]
    problems = []
    for field, mine, theirs in (("octets", observed.octets, truth.octets),
                                ("packets", observed.packets, truth.packets),
                                ("tcp_flags", observed.tcp_flags, truth.tcp_flags)):
        if mine != theirs:
            problems.append(f"{name}: {field} {_show(field, mine)} != capture "
                            f"{_show(field, theirs)}")
    for field, mine, theirs in (("first_ms", observed.first_ms, truth.first_ms),
                                ("last_ms", observed.last_ms, truth.last_ms)):
        if abs(mine - theirs) > time_tolerance_ms:
            problems.append(f"{name}: {field} off by {mine - theirs:+.1f} ms from the capture")
    return problems


def diff_all(observed: dict[FlowKey, FlowObservation], truth: dict[FlowKey, CaptureFlow],
             time_tolerance_ms: float = TIME_TOLERANCE_MS) -> list[str]:
    problems: list[str] = []
    for key, flow in truth.items():
        problems += diff_flow(key, observed.get(key), flow, time_tolerance_ms)
    return problems


def complete(truth: dict[FlowKey, CaptureFlow], ended: bool = False
             ) -> Callable[[dict[FlowKey, FlowObservation]], bool]:
    """Predicate for FlowBook.wait: every flow reached the capture's packet count (and ended)."""

    def check(snapshot: dict[FlowKey, FlowObservation]) -> bool:
        for key, flow in truth.items():
            seen = snapshot.get(key)
            if seen is None or seen.packets < flow.packets:
                return False
            if ended and seen.end == EndCause.NONE:
                return False
        return True

    return check


def of_flow(observed: dict[FlowKey, FlowObservation], netns: int, flow: FiveTuple
            ) -> dict[FlowKey, FlowObservation]:
    """The observations (both directions) of one five-tuple in one namespace."""
    return {k: v for k, v in observed.items() if k.netns == netns and flow.matches(
        (k.direction, k.ip_version, k.protocol, k.src_addr, k.dst_addr, k.src_port, k.dst_port))}


def describe(key: FlowKey) -> str:
    src = ipaddress.ip_address(key.src_addr)
    dst = ipaddress.ip_address(key.dst_addr)
    return (f"[netns {key.netns} {key.direction.name.lower()} proto {key.protocol} "
            f"{src}:{key.src_port} > {dst}:{key.dst_port}]")


def _show(field: str, value: int) -> str:
    return f"{value:#04x}" if field == "tcp_flags" else str(value)


def ends(observations: Iterable[FlowObservation]) -> set[EndCause]:
    return {o.end for o in observations}
