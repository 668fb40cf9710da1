"""What each real collector shows of every element, per protocol: the data behind the README
compatibility notes and behind `collectors.expected_view`.

FIELDS_SHOWN[collector][protocol][IE name] is "" when the collector shows the value exactly, else
the caveat; NOT_SHOWN lists elements a profile sends that the collector does not show, and why.
Every entry was seen with the Debian 12 packages (nfdump 1.7.1, pmacct 1.7.7, tshark 4.0.17) and
netflow 0.12 on the project's streams (tests/collectors).
"""

from __future__ import annotations

from collections.abc import Iterable

COLLECTORS = ("nfdump", "nfacctd", "tshark", "netflow")
REQUIRED_TOOLS = {
    "nfdump": ("nfcapd", "nfdump"),
    "nfacctd": ("nfacctd",),
    "tshark": ("tshark", "tcpdump"),
    "netflow": (),
}

EXACT = ""
TUPLE_V4 = ("sourceIPv4Address", "destinationIPv4Address")
TUPLE_V6 = ("sourceIPv6Address", "destinationIPv6Address")
PORTS = ("sourceTransportPort", "destinationTransportPort")
COMMON = (
    *TUPLE_V4,
    *TUPLE_V6,
    *PORTS,
    "protocolIdentifier",
    "tcpControlBits",
    "ipClassOfService",
    "octetDeltaCount",
    "packetDeltaCount",
    "ingressInterface",
    "egressInterface",
)
TIMES = ("flowStartMilliseconds", "flowEndMilliseconds")
NTOP = (
    "RETRANSMITTED_IN_PKTS",
    "RETRANSMITTED_OUT_PKTS",
    "RETRANSMITTED_IN_BYTES",
    "RETRANSMITTED_OUT_BYTES",
    "CLIENT_NW_LATENCY_MS",
    "SERVER_NW_LATENCY_MS",
    "SRC_PROC_PID",
    "SRC_PROC_NAME",
    "SRC_PROC_UID",
    "DST_PROC_PID",
    "DST_PROC_NAME",
    "DST_PROC_UID",
)
CONTAINER = ("SRC_PROC_CONTAINER_ID", "DST_PROC_CONTAINER_ID")
# v9 has no variable length: strings travel at the element's fixed v9 length, cut there.
V9_CUT = "v9: cut at the element's fixed length (container id: its first 16 characters)"
TSHARK_UNNAMED = (
    "tshark 4.0 has no name for ntop 558/559: raw bytes (cflow.enterprise_private_entry / "
    "cflow.unknown_field_type), read by type from -T pdml"
)
LEGACY_LATENCY = (
    "CLIENT_NW_DELAY_SEC",
    "CLIENT_NW_DELAY_USEC",
    "SERVER_NW_DELAY_SEC",
    "SERVER_NW_DELAY_USEC",
)
V5_EXTRA = (
    "ipNextHopIPv4Address",
    "bgpSourceAsNumber",
    "bgpDestinationAsNumber",
    "sourceIPv4PrefixLength",
    "destinationIPv4PrefixLength",
)
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
        "ipfix": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason"),
            icmpTypeCodeIPv4=ICMP_NOTE,
            icmpTypeCodeIPv6=ICMP_NOTE,
            sourceTransportPort="not for ICMP flows",
            destinationTransportPort="not for ICMP flows",
            ipClassOfService="not for ICMP flows",
        ),
        "v9": _table(
            COMMON,
            TIMES,
            ("flowDirection",),
            icmpTypeCodeIPv4=ICMP_NOTE,
            sourceTransportPort="not for ICMP flows",
            destinationTransportPort="not for ICMP flows",
            ipClassOfService="not for ICMP flows",
            **{
                n: "legacy v9 ids only: `cli/srv latency` = SEC s + USEC us" for n in NFDUMP_LATENCY
            },
        ),
        "v5": _table(
            COMMON,
            TIMES,
            sourceTransportPort="not for ICMP flows",
            destinationTransportPort="not for ICMP flows",
            ipClassOfService="not for ICMP flows",
        ),
    },
    "nfacctd": {
        "ipfix": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason", "ipVersion"),
            ICMP,
            NTOP,
            CONTAINER,
            **{
                n: "custom primitive (aggregate_primitives)"
                for n in ("flowDirection", "flowEndReason", "ipVersion", *ICMP, *NTOP, *CONTAINER)
            },
        ),
        "v9": _table(
            COMMON,
            ("flowDirection", "flowEndReason", "ipVersion"),
            ICMP,
            NTOP,
            LEGACY_LATENCY,
            **{
                n: "custom primitive (aggregate_primitives)"
                for n in (
                    "flowDirection",
                    "flowEndReason",
                    "ipVersion",
                    *ICMP,
                    *NTOP,
                    *LEGACY_LATENCY,
                )
            },
            **{n: f"custom primitive (aggregate_primitives); {V9_CUT}" for n in CONTAINER},
            **{n: "whole seconds (pmacct: unix_secs - (sysUptime - t)/1000)" for n in TIMES},
        ),
        "v5": _table(
            COMMON, **{n: "whole seconds, rounded down or up: unix_nsecs ignored" for n in TIMES}
        ),
    },
    "tshark": {
        "ipfix": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason", "ipVersion", "samplingInterval"),
            ICMP,
            NTOP,
            **{n: "an empty string is not shown" for n in ("SRC_PROC_NAME", "DST_PROC_NAME")},
            **{n: TSHARK_UNNAMED for n in CONTAINER},
        ),
        "v9": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason", "ipVersion", "samplingInterval"),
            ICMP,
            NTOP,
            **{
                n: "shown under ntop's current name for that id (*_throughput)"
                for n in LEGACY_LATENCY
            },
            **{n: f"{TSHARK_UNNAMED}; {V9_CUT}" for n in CONTAINER},
            **{n: "sysUptime-relative, made absolute from the header" for n in TIMES},
        ),
        "v5": _table(COMMON, V5_EXTRA, **{n: "sysUptime-relative, made absolute" for n in TIMES}),
    },
    "netflow": {
        "ipfix": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason", "ipVersion", "samplingInterval"),
            ICMP,
            note="standard profile only: no enterprise or variable-length fields",
        ),
        "v9": _table(
            COMMON,
            TIMES,
            ("flowDirection", "flowEndReason", "ipVersion", "samplingInterval"),
            ICMP,
            NTOP,
            LEGACY_LATENCY,
            **{
                n: "id unknown to netflow 0.12: registered by the harness"
                for n in ("flowEndReason", "icmpTypeCodeIPv6", *NTOP, *LEGACY_LATENCY)
            },
            **{
                n: f"id unknown to netflow 0.12: registered by the harness; {V9_CUT}"
                for n in CONTAINER
            },
        ),
        "v5": _table(COMMON, TIMES, V5_EXTRA),
    },
}
# Elements a profile sends that a collector does not show, and why (README compatibility notes).
NOT_SHOWN: dict[str, dict[str, dict[str, str]]] = {
    "nfdump": {
        "ipfix": {
            "ipVersion": "not stored",
            "samplingInterval": "only from options records",
            **{n: "PEN elements are skipped" for n in (*NTOP, *CONTAINER)},
        },
        "v9": {
            "flowEndReason": "id 136 is not in nfdump 1.7.1's v9 map",
            "samplingInterval": "read as the sampling rate, not printed",
            "icmpTypeCodeIPv6": "v9 reads ICMP type/code only from id 32, also for IPv6; "
            "id 139 is ignored and ICMPv6 flows show 0.0",
            "ipVersion": "not stored",
            **{n: "vendor ids are skipped" for n in (*NTOP, *CONTAINER)},
            **{n: "shown as one latency (nfdump.*_latency_us)" for n in LEGACY_LATENCY},
        },
        "v5": {
            "bgpSourceAsNumber": "not printed by -o raw",
            "bgpDestinationAsNumber": "not printed by -o raw",
            "ipNextHopIPv4Address": "not printed by -o raw",
            "sourceIPv4PrefixLength": "not stored from v5 (printed as 0)",
            "destinationIPv4PrefixLength": "not stored from v5 (printed as 0)",
        },
    },
    "nfacctd": {
        "ipfix": {"samplingInterval": "not a primitive (used for renormalization only)"},
        "v9": {"samplingInterval": "not a primitive (used for renormalization only)"},
        "v5": {
            **{n: "custom primitives exist only for v9/IPFIX" for n in V5_EXTRA},
        },
    },
    "tshark": {"ipfix": {}, "v9": {}, "v5": {}},
    "netflow": {
        "ipfix": {
            n: "enterprise/variable-length elements cannot be decoded: the ntop profile "
            "fails to parse (PaddingCalculationError)"
            for n in (*NTOP, *CONTAINER)
        },
        "v9": {},
        "v5": {},
    },
}
# (collector, protocol, profile) combinations the decoder cannot parse at all.
CANNOT_DECODE = {
    ("netflow", "ipfix", "ntop"): "netflow 0.12 has no variable-length or enterprise elements",
}
# IPv6 addresses cannot exist in v5.
for _collector in COLLECTORS:
    for _name in TUPLE_V6:
        FIELDS_SHOWN[_collector]["v5"].pop(_name, None)


def render_notes(collector: str | None = None) -> str:
    """The compatibility notes as an RST list (for the README): per collector and protocol,
    the caveats of what it shows and what it does not show."""
    lines = []
    for name in [collector] if collector else COLLECTORS:
        lines += [name, "-" * len(name), ""]
        for protocol in ("ipfix", "v9", "v5"):
            shown = FIELDS_SHOWN[name][protocol]
            exact = sorted(n for n, note in shown.items() if not note)
            lines.append(f"* {protocol}: exact: {', '.join(exact) or 'none'}")
            lines += [f"  * {n}: {note}" for n, note in sorted(shown.items()) if note]
            lines += [
                f"  * not shown: {n}: {why}" for n, why in sorted(NOT_SHOWN[name][protocol].items())
            ]
        lines.append("")
    return "\n".join(lines)
