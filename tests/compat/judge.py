"""Judging one collector's decoded flows against the captures' ground truth.

What is compared depends on what the collector shows for the protocol (FIELDS_SHOWN, the same
table the README notes come from): flowDirection and flowEndReason only where shown, times to the
millisecond except where the collector keeps whole seconds, the local process only in the ntop
profile and only where the collector decodes it. A station fed two protocols (IPFIX and v9)
shows each record twice: nfdump and nfacctd tell which protocol a record came in, tshark's flows
do not, so there both copies must be exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ebpf.observation import Direction
from ipfix.profile import load_profile
from tests.harness.collector_common import Flow
from tests.harness.collectors import FIELDS_SHOWN
from tests.live.expect import Expected, merged_late_tail, process_problems

TIME_TOLERANCE_MS = 5  # TC hook vs capture timestamps, and ms truncation on both sides
ICMP = (1, 58)
ACTIVE_TIMEOUT, END_OF_FLOW, IDLE_TIMEOUT = 2, 3, 1
VERSION_KEY = {"nfdump": "nfdump.version", "nfacctd": "pmacct.version"}
PROTOCOL_VERSION = {"ipfix": 10, "v9": 9, "v5": 5}


@dataclass(frozen=True)
class Rules:
    collector: str
    protocol: str
    direction: bool
    reason: bool
    process: bool
    retrans: bool
    times: str  # "ms", "ceil-s" (whole seconds, rounded up) or "s" (whole seconds, either way)

    @classmethod
    def of(cls, collector: str, protocol: str, profile: str) -> Rules:
        shown = FIELDS_SHOWN[collector][protocol]
        fields = set(load_profile(profile).fields)

        def carried(name: str) -> bool:
            return name in fields and name in shown

        times = "ms"
        if collector == "nfacctd" and protocol == "v9":
            times = "ceil-s"
        elif collector == "nfacctd" and protocol == "v5":
            times = "s"
        return cls(collector, protocol, carried("flowDirection"), carried("flowEndReason"),
                   carried("SRC_PROC_PID"), carried("RETRANSMITTED_IN_PKTS"), times)

    def checked(self) -> str:
        """What a passing cell proves, for the matrix (run-independent)."""
        parts = ["flows", "addresses", "ports", "protocol", "bytes", "packets", "TCP flags",
                 {"ms": "times to the ms", "ceil-s": "times (whole s)",
                  "s": "times (whole s)"}[self.times]]
        if self.reason:
            parts.append("end reason")
        if self.direction:
            parts.append("direction")
        if self.retrans:
            parts.append("retransmissions")
        if self.process:
            parts.append("process")
        return ", ".join(parts)


def of_protocol(flows: Sequence[Flow], collector: str, protocol: str) -> list[Flow]:
    """The flows that came in `protocol`, where the collector says (nfdump, nfacctd)."""
    key = VERSION_KEY.get(collector)
    if key is None:
        return list(flows)
    return [f for f in flows if f.get(key) == PROTOCOL_VERSION[protocol]]


def _label(want: Expected) -> str:
    return want.label()


def _index_key(src: object, dst: object, protocol: object, ports: tuple) -> tuple:
    return (src, dst, protocol) if protocol in ICMP else (src, dst, protocol, *ports)


class FlowIndex:
    """Flows by addresses, protocol and (except ICMP, whose ports nfdump does not show) ports:
    thousands of expected records against thousands of flows stay linear."""

    def __init__(self, flows: Sequence[Flow]):
        self._by_key: dict[tuple, list[Flow]] = {}
        for flow in flows:
            src = flow.get("sourceIPv4Address", flow.get("sourceIPv6Address"))
            dst = flow.get("destinationIPv4Address", flow.get("destinationIPv6Address"))
            ports = (flow.get("sourceTransportPort"), flow.get("destinationTransportPort"))
            key = _index_key(src, dst, flow.get("protocolIdentifier"), ports)
            self._by_key.setdefault(key, []).append(flow)

    def candidates(self, want: Expected) -> list[Flow]:
        _, _, protocol, src, dst, sport, dport = want.key
        return self._by_key.get(_index_key(src, dst, protocol, (sport, dport)), [])


def matches(flow: Flow, want: Expected, rules: Rules) -> bool:
    _, version, protocol, src, dst, sport, dport = want.key
    names = (("sourceIPv4Address", "destinationIPv4Address") if version == 4
             else ("sourceIPv6Address", "destinationIPv6Address"))
    if (flow.get(names[0]), flow.get(names[1]), flow.get("protocolIdentifier")) != (
            src, dst, protocol):
        return False
    ports = (flow.get("sourceTransportPort"), flow.get("destinationTransportPort"))
    if protocol in ICMP and rules.collector == "nfdump":
        # nfdump shows ICMP type.code instead of ports; v9 reads it from id 32 only (IPv4)
        icmp = flow.get(f"icmpTypeCodeIPv{version}")
        if ports != (sport, dport) and icmp != dport and not (
                rules.protocol == "v9" and version == 6):
            return False
    elif ports != (sport, dport):
        return False
    if rules.direction and flow.get("flowDirection") != want.direction:
        return False
    interface = "egressInterface" if want.direction == Direction.EGRESS else "ingressInterface"
    return flow.get(interface) == want.endpoint.ifindex


def _time_problem(name: str, have: object, want_ms: float, mode: str) -> str | None:
    if not isinstance(have, int):
        return f"{name} missing"
    if mode == "ms":
        ok = abs(have - want_ms) <= TIME_TOLERANCE_MS
    else:
        low = want_ms - TIME_TOLERANCE_MS - (1000 if mode == "s" else 0)
        ok = have % 1000 == 0 and low <= have <= want_ms + 1000 + TIME_TOLERANCE_MS
    return None if ok else f"{name} {have} vs capture {want_ms:.1f} ({mode})"


def _reasons_allowed(protocol: int) -> tuple[int, ...]:
    # TCP ends are seen (FIN or RST). UDP and ICMP end when their socket closes; a flow with no
    # local socket (the kernel's echo reply) ends by a timeout: the active one when it is due
    # first (the live run has active = idle timeout).
    if protocol == 6:
        return (END_OF_FLOW,)
    return (END_OF_FLOW, IDLE_TIMEOUT, ACTIVE_TIMEOUT)


def record_problems(flow: Flow, want: Expected, rules: Rules) -> list[str]:
    truth, protocol = want.truth, want.key[2]
    problems = []
    for name, value in (("octetDeltaCount", truth.octets), ("packetDeltaCount", truth.packets),
                        ("tcpControlBits", truth.tcp_flags)):
        if flow.get(name) != value:
            problems.append(f"{name} {flow.get(name)!r} != capture {value!r}")
    for name, capture_ms in (("flowStartMilliseconds", truth.first_ms),
                             ("flowEndMilliseconds", truth.last_ms)):
        problem = _time_problem(name, flow.get(name), capture_ms, rules.times)
        if problem:
            problems.append(problem)
    if rules.reason and flow.get("flowEndReason") not in _reasons_allowed(protocol):
        problems.append(f"flowEndReason {flow.get('flowEndReason')!r}")
    if rules.retrans and protocol == 6:
        retrans = truth.retrans_packets if want.direction == Direction.EGRESS else 0
        if flow.get("RETRANSMITTED_IN_PKTS") != retrans:
            problems.append(f"RETRANSMITTED_IN_PKTS {flow.get('RETRANSMITTED_IN_PKTS')!r} != "
                            f"capture {retrans}")
    if rules.process and protocol not in ICMP:
        problems += process_problems(flow, want)
    return problems


def _start_end(flow: Flow) -> tuple:
    return flow.get("flowStartMilliseconds", 0), flow.get("flowEndMilliseconds", 0)


def judge_single(flows: Sequence[Flow], expected: Sequence[Expected], rules: Rules,
                 copies: int = 1) -> list[str]:
    """Each expected direction: exactly `copies` records, each equal to the capture."""
    problems = []
    index = FlowIndex(flows)
    for want in expected:
        if rules.protocol == "v5" and want.version == 6:
            continue
        found = [f for f in index.candidates(want) if matches(f, want, rules)]
        if copies == 1:
            found = merged_late_tail(sorted(found, key=_start_end))
        where = f"{rules.collector}/{rules.protocol} {_label(want)}"
        if len(found) != copies:
            counts = [(f.get("octetDeltaCount"), f.get("packetDeltaCount")) for f in found]
            problems.append(f"{where}: {len(found)} records, want {copies} (capture "
                            f"{want.truth.octets} B / {want.truth.packets} pkts; got {counts})")
            continue
        for flow in found:
            problems += [f"{where}: {p}" for p in record_problems(flow, want, rules)]
    return problems


def judge_split(flows: Sequence[Flow], expected: Sequence[Expected], rules: Rules,
                min_records: int) -> list[str]:
    """A long flow: >= min_records records per direction, ended by the active timeout except the
    last, adding up exactly to the capture, starting and ending where the capture does (a late
    tail after the end-of-flow record merged into it, as judge_single does)."""
    problems = []
    index = FlowIndex(flows)
    for want in expected:
        found = merged_late_tail(sorted(
            (f for f in index.candidates(want) if matches(f, want, rules)), key=_start_end))
        where = f"{rules.collector}/{rules.protocol} {_label(want)}"
        octets = sum(int(f.get("octetDeltaCount", 0)) for f in found)  # type: ignore[call-overload]
        packets = sum(int(f.get("packetDeltaCount", 0)) for f in found)  # type: ignore[call-overload]
        if (octets, packets) != (want.truth.octets, want.truth.packets) or \
                len(found) < min_records:
            problems.append(f"{where}: {len(found)} records of {octets} B / {packets} pkts, "
                            f"want >= {min_records} adding up to {want.truth.octets} B / "
                            f"{want.truth.packets} pkts")
            continue
        reasons = [f.get("flowEndReason") for f in found]
        if rules.reason and reasons != [ACTIVE_TIMEOUT] * (len(found) - 1) + [END_OF_FLOW]:
            problems.append(f"{where}: end reasons {reasons}")
        flags = 0
        for flow in found:
            flags |= int(flow.get("tcpControlBits", 0))  # type: ignore[call-overload]
        if flags != want.truth.tcp_flags:
            problems.append(f"{where}: OR of TCP flags {flags:#x} != capture "
                            f"{want.truth.tcp_flags:#x}")
        for name, flow, capture_ms in (("flowStartMilliseconds", found[0], want.truth.first_ms),
                                       ("flowEndMilliseconds", found[-1], want.truth.last_ms)):
            problem = _time_problem(name, flow.get(name), capture_ms, rules.times)
            if problem:
                problems.append(f"{where}: {problem}")
    return problems
