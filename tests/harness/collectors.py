"""Decode exported datagrams with REAL collectors and compare, field by field, with the records.

Four independent decoders, each as a start/stop class (for a live exporter) and a one-shot:

    nfdump   Nfcapd            decode_with_nfdump(datagrams, ip_version) -> (flows, seq errors)
    nfacctd  Nfacctd           decode_with_nfacctd(datagrams, ...)       -> (flows, seq errors)
    tshark   TsharkCapture     decode_with_tshark(datagrams, ...)        -> TsharkResult
    netflow  (in process)      decode_with_netflow(datagrams)            -> flows

Every decoded flow is a dict keyed by IE name, in the agent's record form (addresses packed bytes,
times epoch ms). FIELDS_SHOWN says which elements each collector shows per protocol, with the
caveats that become the README compatibility notes; `expected_view` applies those caveats to an
input record, and `compare` matches decoded flows to records and lists every difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tests.harness.collector_common import (
    CollectorError,
    Flow,
    free_udp_port,
    send_datagrams,
    write_pcap,
)
from tests.harness.collector_netflow import decode_with_netflow
from tests.harness.collector_nfdump import Nfcapd, decode_with_nfdump
from tests.harness.collector_pmacct import DEFAULT_PRIMITIVES, Nfacctd, Primitive, decode_with_nfacctd
from tests.harness.collector_tshark import TsharkCapture, TsharkResult, decode_with_tshark

__all__ = [
    "CANNOT_DECODE",
    "COLLECTORS",
    "FIELDS_SHOWN",
    "NOT_SHOWN",
    "CollectorError",
    "DEFAULT_PRIMITIVES",
    "Flow",
    "Nfacctd",
    "Nfcapd",
    "Primitive",
    "REQUIRED_TOOLS",
    "TsharkCapture",
    "TsharkResult",
    "compare",
    "decode_with_netflow",
    "decode_with_nfacctd",
    "decode_with_nfdump",
    "decode_with_tshark",
    "expected_view",
    "flow_key",
    "free_udp_port",
    "send_datagrams",
    "write_pcap",
]

COLLECTORS = ("nfdump", "nfacctd", "tshark", "netflow")
REQUIRED_TOOLS = {
    "nfdump": ("nfcapd", "nfdump"),
    "nfacctd": ("nfacctd",),
    "tshark": ("tshark",),
    "netflow": (),
}

EXACT = ""
TUPLE_V4 = ("sourceIPv4Address", "destinationIPv4Address")
TUPLE_V6 = ("sourceIPv6Address", "destinationIPv6Address")
PORTS = ("sourceTransportPort", "destinationTransportPort")
COMMON = (*TUPLE_V4, *TUPLE_V6, *PORTS, "protocolIdentifier", "tcpControlBits",
          "ipClassOfService", "octetDeltaCount", "packetDeltaCount", "ingressInterface",
          "egressInterface")
TIMES = ("flowStartMilliseconds", "flowEndMilliseconds")
NTOP = ("RETRANSMITTED_IN_PKTS", "RETRANSMITTED_OUT_PKTS", "RETRANSMITTED_IN_BYTES",
        "RETRANSMITTED_OUT_BYTES", "CLIENT_NW_LATENCY_MS", "SERVER_NW_LATENCY_MS",
        "SRC_PROC_PID", "SRC_PROC_NAME", "SRC_PROC_UID", "DST_PROC_PID", "DST_PROC_NAME",
        "DST_PROC_UID")
LEGACY_LATENCY = ("CLIENT_NW_DELAY_SEC", "CLIENT_NW_DELAY_USEC", "SERVER_NW_DELAY_SEC",
                  "SERVER_NW_DELAY_USEC")
V5_EXTRA = ("ipNextHopIPv4Address", "bgpSourceAsNumber", "bgpDestinationAsNumber",
            "sourceIPv4PrefixLength", "destinationIPv4PrefixLength")
ICMP = ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6")
NFDUMP_LATENCY = ("nfdump.client_latency_us", "nfdump.server_latency_us")


def _table(*groups: Iterable[str], note: str = EXACT, **notes: str) -> dict[str, str]:
    table = {name: note for group in groups for name in group}
    table.update(notes)
    return table


ICMP_NOTE = "ICMP flows only (nfdump prints type.code instead of ports)"
# What each collector shows, per protocol: IE name -> "" (exact) or the caveat.
FIELDS_SHOWN: dict[str, dict[str, dict[str, str]]] = {
    "nfdump": {
        "ipfix": _table(COMMON, TIMES, ("flowDirection", "flowEndReason"),
                        icmpTypeCodeIPv4=ICMP_NOTE, icmpTypeCodeIPv6=ICMP_NOTE,
                        sourceTransportPort="not for ICMP flows",
                        destinationTransportPort="not for ICMP flows",
                        ipClassOfService="not for ICMP flows"),
        "v9": _table(COMMON, TIMES, ("flowDirection",),
                     icmpTypeCodeIPv4=ICMP_NOTE,
                     sourceTransportPort="not for ICMP flows",
                     destinationTransportPort="not for ICMP flows",
                     ipClassOfService="not for ICMP flows",
                     **{n: "legacy v9 ids only: `cli/srv latency` = SEC s + USEC us"
                        for n in NFDUMP_LATENCY}),
        "v5": _table(COMMON, TIMES,
                     sourceTransportPort="not for ICMP flows",
                     destinationTransportPort="not for ICMP flows",
                     ipClassOfService="not for ICMP flows"),
    },
    "nfacctd": {
        "ipfix": _table(COMMON, TIMES, ("flowDirection", "flowEndReason", "ipVersion"), ICMP,
                        NTOP, **{n: "custom primitive (aggregate_primitives)"
                                 for n in ("flowDirection", "flowEndReason", "ipVersion",
                                           *ICMP, *NTOP)}),
        "v9": _table(COMMON, ("flowDirection", "flowEndReason", "ipVersion"), ICMP, NTOP,
                     LEGACY_LATENCY,
                     **{n: "custom primitive (aggregate_primitives)"
                        for n in ("flowDirection", "flowEndReason", "ipVersion", *ICMP, *NTOP,
                                  *LEGACY_LATENCY)},
                     **{n: "whole seconds (pmacct: unix_secs - (sysUptime - t)/1000)"
                        for n in TIMES}),
        "v5": _table(COMMON, **{n: "whole seconds, rounded down or up: unix_nsecs ignored"
                                 for n in TIMES}),
    },
    "tshark": {
        "ipfix": _table(COMMON, TIMES, ("flowDirection", "flowEndReason", "ipVersion",
                                        "samplingInterval"), ICMP, NTOP,
                        **{n: "an empty string is not shown" for n in
                           ("SRC_PROC_NAME", "DST_PROC_NAME")}),
        "v9": _table(COMMON, TIMES, ("flowDirection", "flowEndReason", "ipVersion",
                                     "samplingInterval"), ICMP, NTOP,
                     **{n: "shown under ntop's current name for that id (*_throughput)"
                        for n in LEGACY_LATENCY},
                     **{n: "sysUptime-relative, made absolute from the header" for n in TIMES}),
        "v5": _table(COMMON, V5_EXTRA, **{n: "sysUptime-relative, made absolute" for n in TIMES}),
    },
    "netflow": {
        "ipfix": _table(COMMON, TIMES, ("flowDirection", "flowEndReason", "ipVersion",
                                        "samplingInterval"), ICMP,
                        note="standard profile only: no enterprise or variable-length fields"),
        "v9": _table(COMMON, TIMES, ("flowDirection", "flowEndReason", "ipVersion",
                                     "samplingInterval"), ICMP, NTOP, LEGACY_LATENCY,
                     **{n: "id unknown to netflow 0.12: registered by the harness"
                        for n in ("flowEndReason", "icmpTypeCodeIPv6", *NTOP,
                                  *LEGACY_LATENCY)}),
        "v5": _table(COMMON, TIMES, V5_EXTRA),
    },
}
# Elements a profile sends that a collector does not show, and why (README compatibility notes).
NOT_SHOWN: dict[str, dict[str, dict[str, str]]] = {
    "nfdump": {
        "ipfix": {"ipVersion": "not stored", "samplingInterval": "only from options records",
                  **{n: "PEN elements are skipped" for n in NTOP}},
        "v9": {"flowEndReason": "id 136 is not in nfdump 1.7.1's v9 map",
               "icmpTypeCodeIPv6": "v9 reads ICMP type/code only from id 32, also for IPv6; "
                                   "id 139 is ignored and ICMPv6 flows show 0.0",
               "ipVersion": "not stored",
               **{n: "vendor ids are skipped" for n in NTOP},
               **{n: "shown as one latency (nfdump.*_latency_us)" for n in LEGACY_LATENCY}},
        "v5": {"bgpSourceAsNumber": "not printed by -o raw", "bgpDestinationAsNumber": "idem",
               "ipNextHopIPv4Address": "not printed by -o raw",
               "sourceIPv4PrefixLength": "not stored from v5 (printed as 0)",
               "destinationIPv4PrefixLength": "not stored from v5 (printed as 0)"},
    },
    "nfacctd": {
        "ipfix": {"samplingInterval": "not a primitive (used for renormalization only)"},
        "v9": {"samplingInterval": "not a primitive (used for renormalization only)"},
        "v5": {"flowDirection": "v5 has none", "ipNextHopIPv4Address": "not aggregated here",
               **{n: "custom primitives exist only for v9/IPFIX" for n in V5_EXTRA}},
    },
    "tshark": {"ipfix": {}, "v9": {}, "v5": {}},
    "netflow": {
        "ipfix": {n: "enterprise/variable-length elements cannot be decoded: the ntop profile "
                     "fails to parse (PaddingCalculationError)" for n in NTOP},
        "v9": {},
        "v5": {},
    },
}
# (collector, protocol, profile) combinations the decoder cannot parse at all.
CANNOT_DECODE = {
    ("netflow", "ipfix", "ntop"): "netflow 0.12 has no variable-length or enterprise elements",
}
for _protocol in ("ipfix", "v9", "v5"):  # v6 addresses in v5 cannot exist
    for _collector in COLLECTORS:
        if _protocol == "v5":
            for _name in TUPLE_V6:
                FIELDS_SHOWN[_collector][_protocol].pop(_name, None)

IPV6_ONLY = frozenset({*TUPLE_V6, "icmpTypeCodeIPv6"})
IPV4_ONLY = frozenset({*TUPLE_V4, "icmpTypeCodeIPv4", "ipNextHopIPv4Address",
                       "sourceIPv4PrefixLength", "destinationIPv4PrefixLength"})
STRINGS = frozenset({"SRC_PROC_NAME", "DST_PROC_NAME"})
ICMP_PROTOCOLS = (1, 58)


def _ceil_seconds_ms(ms: int) -> int:
    return -(-ms // 1000) * 1000


def _zero(name: str) -> object:
    """How a field the record lacks is encoded (and so decoded): zero, empty, 0.0.0.0."""
    if name in STRINGS:
        return ""
    if name.endswith("IPv4Address"):
        return bytes(4)
    if name.endswith("IPv6Address"):
        return bytes(16)
    return 0


def expected_view(record: Flow, collector: str, protocol: str, fields: Sequence[str]) -> Flow:
    """What `collector` should show for `record` exported over `protocol` with a template of
    `fields` (the profile's): the shown fields of the record's address family, a missing field
    as zero / empty (that is how it is encoded), and each collector's documented caveats."""
    shown = FIELDS_SHOWN[collector][protocol]
    is_v6 = "sourceIPv6Address" in record
    other_family = IPV4_ONLY if is_v6 else IPV6_ONLY
    view: Flow = {}
    for name in fields:
        if name in shown and name not in other_family:
            view[name] = record.get(name, _zero(name))
    is_icmp = record.get("protocolIdentifier") in ICMP_PROTOCOLS
    if collector == "nfdump":
        if is_icmp:
            for name in (*PORTS, "ipClassOfService"):
                view.pop(name, None)
        else:
            view.pop("icmpTypeCodeIPv4", None)
            view.pop("icmpTypeCodeIPv6", None)
        if protocol == "v9" and "CLIENT_NW_DELAY_USEC" in fields:
            for side, key in (("CLIENT", NFDUMP_LATENCY[0]), ("SERVER", NFDUMP_LATENCY[1])):
                view[key] = int(record.get(f"{side}_NW_DELAY_SEC", 0)) * 1_000_000 + int(
                    record.get(f"{side}_NW_DELAY_USEC", 0)
                )
    if collector == "nfacctd" and protocol == "v9":
        # unix_secs - (sysUptime - t)/1000 with integer division; v9 headers are whole seconds
        # (sysUptime from the same instant), so this is t rounded up to a whole second.
        for name in TIMES:
            if name in view:
                view[name] = _ceil_seconds_ms(int(view[name]))  # type: ignore[arg-type]
    if collector == "nfacctd" and protocol == "v5":
        # The same formula, but pmacct ignores unix_nsecs: rounded down or up, depending on the
        # export instant's milliseconds.
        for name in TIMES:
            if name in view:
                ms = int(view[name])  # type: ignore[arg-type]
                view[name] = OneOf((ms // 1000 * 1000, _ceil_seconds_ms(ms)))
    return view


class OneOf(tuple):
    """An expected value a collector may show in more than one documented way."""

    def __eq__(self, other: object) -> bool:
        return other in tuple(self)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return " or ".join(map(repr, self))


KEY_FIELDS = (*TUPLE_V4, *TUPLE_V6, *PORTS, "protocolIdentifier")


def flow_key(flow: Flow) -> tuple:
    """Records in these tests differ in addresses, ports or protocol: that is the match key."""
    return tuple(flow.get(name) for name in KEY_FIELDS)


def _show(value: object) -> str:
    if isinstance(value, bytes) and len(value) in (4, 16):
        import ipaddress

        return str(ipaddress.ip_address(value))
    return repr(value)


def compare(
    decoded: Sequence[Flow],
    records: Sequence[Flow],
    collector: str,
    protocol: str,
    fields: Sequence[str],
) -> list[str]:
    """Every difference between what `collector` decoded and what it should show for `records`:
    missing records, unexpected records, duplicates, and each field that differs. Empty = exact."""
    problems: list[str] = []
    expected = [expected_view(r, collector, protocol, fields) for r in records]
    by_key: dict[tuple, list[Flow]] = {}
    for flow in decoded:
        view_key = flow_key({k: v for k, v in flow.items() if k in KEY_FIELDS})
        by_key.setdefault(view_key, []).append(flow)
    for view in expected:
        key = flow_key(view)
        matches = by_key.pop(key, [])
        label = ", ".join(_show(v) for v in key if v is not None)
        if not matches:
            problems.append(f"{collector}/{protocol}: record ({label}) missing")
            continue
        if len(matches) > 1:
            problems.append(f"{collector}/{protocol}: record ({label}) decoded {len(matches)}x")
        got = matches[0]
        for name, want in view.items():
            have = got.get(name, "" if name in STRINGS and want == "" else None)
            if have != want:
                problems.append(
                    f"{collector}/{protocol}: ({label}) {name}: got {_show(have)}, "
                    f"want {_show(want)}"
                )
    for key, flows in by_key.items():
        label = ", ".join(_show(v) for v in key if v is not None)
        problems.append(f"{collector}/{protocol}: unexpected record ({label}) x{len(flows)}")
    return problems
