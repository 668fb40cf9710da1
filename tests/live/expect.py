"""What a collector must show for a lab connection, derived from the packet captures, and every
difference between that and what it decoded, one readable line each.

A record carries no network namespace, but on a lab connection (flowDirection, 5-tuple, interface)
tells the four records apart: the client's egress and the server's ingress share the 5-tuple but
not the direction; the interface index (egressInterface for egress, ingressInterface for ingress)
names the veth end, which also keeps apart records of the same packets seen in a forwarding
namespace in between (NetLab(wire=True)).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ebpf.observation import Direction
from tests.harness.collector_common import Flow
from tests.harness.netlab import Endpoint
from tests.harness.netlab_capture import CaptureFlow, CaptureKey
from tests.harness.netlab_flows import FiveTuple
from tests.harness.netlab_proc import Exchange, ProcReport

TIME_TOLERANCE_MS = 5  # TC hook vs capture timestamps, and ms truncation on both sides
END_OF_FLOW, ACTIVE_TIMEOUT, FORCED_END = 3, 2, 4


@dataclass(frozen=True)
class Expected:
    """One direction of a lab connection as seen by one endpoint: what its record must show."""

    endpoint: Endpoint
    key: CaptureKey  # (direction, version, protocol, src, dst, sport, dport)
    truth: CaptureFlow
    process: ProcReport  # the endpoint's traffic process

    @property
    def direction(self) -> int:
        return int(self.key[0])

    @property
    def version(self) -> int:
        return self.key[1]

    def label(self) -> str:
        _, version, protocol, src, dst, sport, dport = self.key
        way = "egress" if self.direction == Direction.EGRESS else "ingress"
        return (f"[{self.endpoint.role} {way} {ipaddress.ip_address(src)}:{sport} > "
                f"{ipaddress.ip_address(dst)}:{dport} proto {protocol}]")

    def matches(self, flow: Flow) -> bool:
        _, version, protocol, src, dst, sport, dport = self.key
        names = (("sourceIPv4Address", "destinationIPv4Address") if version == 4
                 else ("sourceIPv6Address", "destinationIPv6Address"))
        interface = "egressInterface" if self.direction == Direction.EGRESS else "ingressInterface"
        return (flow.get(names[0]) == src and flow.get(names[1]) == dst
                and flow.get("sourceTransportPort") == sport
                and flow.get("destinationTransportPort") == dport
                and flow.get("protocolIdentifier") == protocol
                and flow.get("flowDirection") == self.direction
                and flow.get(interface) == self.endpoint.ifindex)


def five_tuple(exchange: Exchange, protocol: int = 6) -> FiveTuple:
    c, s = exchange.client, exchange.server
    return FiveTuple(exchange.version, protocol, c.local[0], c.local[1], s.local[0], s.local[1])


def expected_records(exchange: Exchange, client: Endpoint, server: Endpoint,
                     client_capture: dict[CaptureKey, CaptureFlow],
                     server_capture: dict[CaptureKey, CaptureFlow]) -> list[Expected]:
    """The four records of one connection (both directions on both ends), from the captures."""
    flow = five_tuple(exchange)
    out = []
    for endpoint, capture, report in ((client, client_capture, exchange.client),
                                      (server, server_capture, exchange.server)):
        out += [Expected(endpoint, key, truth, report)
                for key, truth in capture.items() if flow.matches(key)]
    return out


def records_of(flows: Iterable[Flow], expected: Expected) -> list[Flow]:
    """The collector's records of one expected direction, oldest first."""
    found = [f for f in flows if expected.matches(f)]
    return sorted(found, key=lambda f: (f.get("flowStartMilliseconds", 0),
                                        f.get("flowEndMilliseconds", 0)))


TCP_SYN = 0x02
LATE_TAIL_MAX_PACKETS = 2


def merged_late_tail(records: Sequence[Flow]) -> list[Flow]:
    """A TCP connection's end-of-flow record followed by its late packets, as one record.

    The kernel ends a connection at the ACK of its second FIN (ebpf/README.md). A packet after
    that - the duplicate ACK answering a FIN the peer retransmitted because our ACK came late, as
    a loaded machine makes happen - starts a flow of its own, as a router's FIN expiry does. Such
    a tail (at most two packets, no SYN, starting at or after the end-of-flow record's end) is
    merged back: counts summed, flags ORed, the end-of-flow record's start and reason, the last
    end; the merged record must still equal the capture. Records before the end-of-flow one (a
    long flow split by the active timeout) are kept as they are; anything else is returned as it
    is."""
    ends = [at for at, record in enumerate(records) if record.get("flowEndReason") == END_OF_FLOW]
    if not ends or ends[0] == len(records) - 1:
        return list(records)
    first, tail = records[ends[0]], records[ends[0] + 1:]
    end = first.get("flowEndMilliseconds", 0)
    for late in tail:
        if (late.get("protocolIdentifier", 6) != 6
                or int(late.get("tcpControlBits", 0)) & TCP_SYN  # type: ignore[call-overload]
                or int(late.get("packetDeltaCount", 0)) > LATE_TAIL_MAX_PACKETS  # type: ignore[call-overload]
                or int(late.get("flowStartMilliseconds", 0)) < int(end)):  # type: ignore[call-overload]
            return list(records)
    merged = dict(first)
    for late in tail:
        for field in ("octetDeltaCount", "packetDeltaCount"):
            merged[field] = int(merged.get(field, 0)) + int(late.get(field, 0))  # type: ignore[call-overload]
        merged["tcpControlBits"] = (int(merged.get("tcpControlBits", 0))  # type: ignore[call-overload]
                                    | int(late.get("tcpControlBits", 0)))  # type: ignore[call-overload]
        merged["flowEndMilliseconds"] = max(int(merged.get("flowEndMilliseconds", 0)),  # type: ignore[call-overload]
                                            int(late.get("flowEndMilliseconds", 0)))  # type: ignore[call-overload]
    return [*records[:ends[0]], merged]


def exported_in_full(flows: Iterable[Flow], expected: Expected) -> bool:
    """Whether the records of one expected direction are all out: an end-of-flow record, and
    packets adding up to at least the capture's. The end-of-flow record alone is not enough:
    a late packet's record (merged_late_tail) leaves by the agent's timeout, seconds later."""
    found = records_of(flows, expected)
    packets = sum(int(f.get("packetDeltaCount", 0)) for f in found)  # type: ignore[call-overload]
    return (any(f.get("flowEndReason") == END_OF_FLOW for f in found)
            and packets >= expected.truth.packets)


def _time_problem(name: str, have: object, want_ms: float, whole_seconds: bool) -> str | None:
    if not isinstance(have, int):
        return f"{name} missing"
    if whole_seconds:
        # nfacctd v9 keeps whole seconds, rounded up (collectors.md 1.1, FIELDS_SHOWN)
        ok = have % 1000 == 0 and want_ms - TIME_TOLERANCE_MS <= have <= (
            want_ms + 1000 + TIME_TOLERANCE_MS)
        return None if ok else f"{name} {have} is not capture {want_ms:.1f} rounded up to 1 s"
    if abs(have - want_ms) > TIME_TOLERANCE_MS:
        return f"{name} off by {have - want_ms:+.1f} ms from the capture"
    return None


def diff_single(collector: str, flows: Sequence[Flow], expected: Sequence[Expected], *,
                reason: int = END_OF_FLOW, whole_seconds: bool = False,
                process: bool = False) -> list[str]:
    """Each expected direction must be exactly one record equal to the capture: octets, packets,
    TCP flags, times, end reason (and the local process on the local side, ntop profile)."""
    problems = []
    for want in expected:
        name = f"{collector} {want.label()}"
        found = merged_late_tail(records_of(flows, want))
        if len(found) != 1:
            shown = [(f.get("octetDeltaCount"), f.get("packetDeltaCount"),
                      f.get("flowEndReason")) for f in found]
            problems.append(f"{name}: {len(found)} records, want 1 "
                            f"(capture {want.truth.octets} B / {want.truth.packets} pkts; "
                            f"got (octets, packets, reason) {shown})")
            continue
        problems += [f"{name}: {p}" for p in _record_problems(found[0], want, reason,
                                                              whole_seconds, process)]
    return problems


def _record_problems(flow: Flow, want: Expected, reason: int, whole_seconds: bool,
                     process: bool) -> list[str]:
    truth = want.truth
    problems = []
    for field, value in (("octetDeltaCount", truth.octets), ("packetDeltaCount", truth.packets),
                         ("tcpControlBits", truth.tcp_flags), ("flowEndReason", reason)):
        if flow.get(field) != value:
            problems.append(f"{field} {flow.get(field)!r} != {value!r}")
    if "ipVersion" in flow and flow["ipVersion"] != want.version:
        problems.append(f"ipVersion {flow['ipVersion']} != {want.version}")
    for field, capture_ms in (("flowStartMilliseconds", truth.first_ms),
                              ("flowEndMilliseconds", truth.last_ms)):
        problem = _time_problem(field, flow.get(field), capture_ms, whole_seconds)
        if problem:
            problems.append(problem)
    if "RETRANSMITTED_IN_PKTS" in flow:
        retrans = truth.retrans_packets if want.direction == Direction.EGRESS else 0
        if flow["RETRANSMITTED_IN_PKTS"] != retrans:
            problems.append(f"RETRANSMITTED_IN_PKTS {flow['RETRANSMITTED_IN_PKTS']} != "
                            f"capture {retrans}")
    if process:
        problems += process_problems(flow, want)
    return problems


def process_problems(flow: Flow, want: Expected) -> list[str]:
    """The local process sits on the local side: SRC_PROC_* on egress, DST_PROC_* on ingress."""
    side = "SRC" if want.direction == Direction.EGRESS else "DST"
    other = "DST" if side == "SRC" else "SRC"
    problems = []
    for field, value in ((f"{side}_PROC_NAME", want.process.comm),
                         (f"{side}_PROC_PID", want.process.pid)):
        if flow.get(field) != value:
            problems.append(f"{field} {flow.get(field)!r} != {value!r}")
    if flow.get(f"{other}_PROC_PID", 0) != 0 or flow.get(f"{other}_PROC_NAME", "") != "":
        problems.append(f"{other}_PROC_* set on the remote side: {flow.get(f'{other}_PROC_PID')}"
                        f" {flow.get(f'{other}_PROC_NAME')!r}")
    return problems


def diff_split(collector: str, flows: Sequence[Flow], expected: Sequence[Expected], *,
               min_records: int, final_reason: int = END_OF_FLOW) -> list[str]:
    """Each expected direction split by the active timeout: >= min_records records, reasons 2
    then `final_reason` last, counts adding up to the capture exactly, periods in time order
    without overlap, the first starting and the last ending where the capture does. A late tail
    after the end-of-flow record is part of that record (merged_late_tail)."""
    problems = []
    for want in expected:
        name = f"{collector} {want.label()}"
        found = merged_late_tail(records_of(flows, want))
        octets = sum(int(f.get("octetDeltaCount", 0)) for f in found)  # type: ignore[call-overload]
        packets = sum(int(f.get("packetDeltaCount", 0)) for f in found)  # type: ignore[call-overload]
        reasons = [f.get("flowEndReason") for f in found]
        summary = f"{len(found)} records, reasons {reasons}"
        if (octets, packets) != (want.truth.octets, want.truth.packets):
            problems.append(f"{name}: records add up to {octets} B / {packets} pkts, capture "
                            f"{want.truth.octets} B / {want.truth.packets} pkts ({summary})")
        if len(found) < min_records:
            problems.append(f"{name}: {summary}, want at least {min_records}")
        if not found:
            continue
        if reasons != [ACTIVE_TIMEOUT] * (len(found) - 1) + [final_reason]:
            problems.append(f"{name}: reasons {reasons}, want 2 ... 2 then {final_reason}")
        for before, after in zip(found, found[1:], strict=False):
            if after["flowStartMilliseconds"] < before["flowEndMilliseconds"]:  # type: ignore[operator]
                problems.append(f"{name}: record starting {after['flowStartMilliseconds']} "
                                f"overlaps the one ending {before['flowEndMilliseconds']}")
        for field, flow, capture_ms in (
            ("flowStartMilliseconds", found[0], want.truth.first_ms),
            ("flowEndMilliseconds", found[-1], want.truth.last_ms),
        ):
            problem = _time_problem(field, flow.get(field), capture_ms, whole_seconds=False)
            if problem:
                problems.append(f"{name}: {problem}")
        flags = 0
        for flow in found:
            flags |= int(flow.get("tcpControlBits", 0))  # type: ignore[call-overload]
        if flags != want.truth.tcp_flags:
            problems.append(f"{name}: OR of tcpControlBits {flags:#04x} != capture "
                            f"{want.truth.tcp_flags:#04x}")
    return problems
