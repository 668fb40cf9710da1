"""Flow records from cache exports: a dict keyed by IE name, with the keys the profile needs.

Semantics (collectors.md 3.2):
- flowDirection is relative to this host; the interface index goes to ingressInterface for
  ingress records and to egressInterface for egress records.
- Retransmissions are the socket's own, so they travel in the direction this host sends: an
  egress record carries them as RETRANSMITTED_IN_* (IN = the record's own direction). The peer's
  retransmissions are not observable here; they are reported as 0, never guessed.
- CLIENT/SERVER_NW_LATENCY_MS is half the RTT as seen from the probe, here the local host: on the
  client host the client side is ~0 and the server side is RTT/2, and the reverse on a server.
- The local process goes into SRC_PROC_* when the local end is the source (egress), else DST_PROC_*.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from operator import itemgetter
from pathlib import Path

from bridge.cache import Export, Flow
from ebpf.observation import Direction

INGRESS = Direction.INGRESS
EGRESS = Direction.EGRESS
TCP = 6

# Reverse elements of a biflow record (RFC 5103): what differs per direction.
BIFLOW_REVERSE = (
    "reverseOctetDeltaCount",
    "reversePacketDeltaCount",
    "reverseTcpControlBits",
    "reverseFlowStartMilliseconds",
    "reverseFlowEndMilliseconds",
)
BIFLOW_EXTRA = (*BIFLOW_REVERSE, "biflowDirection")

_NTOP_RETRANS = {
    "RETRANSMITTED_IN_PKTS",
    "RETRANSMITTED_OUT_PKTS",
    "RETRANSMITTED_IN_BYTES",
    "RETRANSMITTED_OUT_BYTES",
}
_LATENCY = {"CLIENT_NW_LATENCY_MS", "SERVER_NW_LATENCY_MS"}
_LEGACY_LATENCY = {
    "CLIENT_NW_DELAY_SEC",
    "CLIENT_NW_DELAY_USEC",
    "SERVER_NW_DELAY_SEC",
    "SERVER_NW_DELAY_USEC",
}
_PROCESS = {
    "SRC_PROC_PID",
    "SRC_PROC_NAME",
    "SRC_PROC_UID",
    "DST_PROC_PID",
    "DST_PROC_NAME",
    "DST_PROC_UID",
}


def ephemeral_port_range() -> tuple[int, int]:
    """The local port range the kernel picks client ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def local_is_client(flow: Flow, ephemeral: tuple[int, int]) -> bool:
    """Whether this host initiated the connection. The observation does not say, so the ports
    decide: the side using an ephemeral port while the other does not is the client; otherwise
    the lower port is taken as the service."""
    key = flow.key
    if key.direction == EGRESS:
        local, remote = key.src_port, key.dst_port
    else:
        local, remote = key.dst_port, key.src_port
    low, high = ephemeral
    local_eph = low <= local <= high
    remote_eph = low <= remote <= high
    if local_eph != remote_eph:
        return local_eph
    return local > remote


def biflow_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """The profile's fields plus the reverse elements a biflow record carries."""
    extra = [name for name in BIFLOW_EXTRA if name not in fields]
    return (*fields, *extra)


def biflow_profile(profile):  # type: ignore[no-untyped-def]
    """A copy of an ipfix.profile.Profile extended for RFC 5103 biflow records."""
    return replace(profile, name=f"{profile.name}+biflow", fields=biflow_fields(profile.fields))


class RecordBuilder:
    """Builds records for one profile. Keys every profile needs are always set; the costlier
    vendor keys only when the profile lists them."""

    def __init__(
        self,
        fields: Iterable[str],
        *,
        biflow: bool = False,
        ephemeral: tuple[int, int] | None = None,
    ) -> None:
        wanted = set(fields)
        self.biflow = biflow
        self._retrans = bool(wanted & _NTOP_RETRANS)
        self._latency = bool(wanted & _LATENCY)
        self._legacy_latency = bool(wanted & _LEGACY_LATENCY)
        self._process = bool(wanted & _PROCESS)
        self._icmp = bool(wanted & {"icmpTypeCodeIPv4", "icmpTypeCodeIPv6"})
        self._ephemeral = ephemeral or ephemeral_port_range()

    def build(self, exports: Sequence[Export]) -> list[dict]:
        if self.biflow:
            return [self._biflow_record(e) for e in exports]
        base = self._base
        if not (self._retrans or self._latency or self._legacy_latency or self._process):
            return [base(e) for e in exports]
        records = []
        for export in exports:
            record = base(export)
            self._vendor(record, export, export[0])
            records.append(record)
        return records

    def _base(self, export: Export) -> dict:
        flow, octets, packets, start_ms, end_ms, reason = export[:6]
        key = flow.key
        protocol = key.protocol
        ifindex = flow.ifindex
        egress = key.direction == EGRESS
        # One dict literal per record: the cheapest way to build it in CPython.
        record = {
            "sourceTransportPort": key.src_port,
            "destinationTransportPort": key.dst_port,
            "protocolIdentifier": protocol,
            "tcpControlBits": flow.tcp_flags & 0xFF if protocol == TCP else 0,
            "octetDeltaCount": octets,
            "packetDeltaCount": packets,
            "flowStartMilliseconds": start_ms,
            "flowEndMilliseconds": end_ms,
            "flowDirection": 1 if egress else 0,
            "ingressInterface": 0 if egress else ifindex,
            "egressInterface": ifindex if egress else 0,
            "flowEndReason": reason,
        }
        if len(key.src_addr) == 4:
            record["sourceIPv4Address"] = key.src_addr
            record["destinationIPv4Address"] = key.dst_addr
            record["ipVersion"] = 4
        else:
            record["sourceIPv6Address"] = key.src_addr
            record["destinationIPv6Address"] = key.dst_addr
            record["ipVersion"] = 6
        if self._icmp and (protocol == 1 or protocol == 58):
            record["icmpTypeCodeIPv4" if protocol == 1 else "icmpTypeCodeIPv6"] = key.dst_port
        return record

    def _vendor(self, record: dict, export: Export, flow: Flow) -> None:
        egress = flow.key.direction == EGRESS
        if self._retrans:
            retrans, retrans_bytes = (export[6], export[7]) if egress else (0, 0)
            record["RETRANSMITTED_IN_PKTS"] = retrans
            record["RETRANSMITTED_IN_BYTES"] = retrans_bytes
            record["RETRANSMITTED_OUT_PKTS"] = 0
            record["RETRANSMITTED_OUT_BYTES"] = 0
        tcp = flow.tcp
        if (self._latency or self._legacy_latency) and tcp is not None and tcp.srtt_us:
            half_rtt_us = tcp.srtt_us // 2
            if local_is_client(flow, self._ephemeral):
                client_us, server_us = 0, half_rtt_us
            else:
                client_us, server_us = half_rtt_us, 0
            if self._latency:
                record["CLIENT_NW_LATENCY_MS"] = (client_us + 500) // 1000
                record["SERVER_NW_LATENCY_MS"] = (server_us + 500) // 1000
            if self._legacy_latency:
                record["CLIENT_NW_DELAY_SEC"], record["CLIENT_NW_DELAY_USEC"] = divmod(
                    client_us, 1_000_000
                )
                record["SERVER_NW_DELAY_SEC"], record["SERVER_NW_DELAY_USEC"] = divmod(
                    server_us, 1_000_000
                )
        process = flow.process
        if self._process and process is not None:
            side = "SRC" if egress else "DST"
            record[f"{side}_PROC_PID"] = process.pid
            record[f"{side}_PROC_NAME"] = process.comm
            record[f"{side}_PROC_UID"] = process.uid

    def _biflow_record(self, export: Export) -> dict:
        """Forward = the initiator's direction when both are known (biflowDirection 1)."""
        peer = export[8]
        if peer is not None and local_is_client(export[0], self._ephemeral) != (
            export[0].key.direction == EGRESS
        ):
            export, peer = peer, export
        flow = export[0]
        record = self._base(export)
        self._vendor(record, export, flow)
        if peer is None:
            record["reverseOctetDeltaCount"] = 0
            record["reversePacketDeltaCount"] = 0
            record["reverseTcpControlBits"] = 0
            record["reverseFlowStartMilliseconds"] = 0
            record["reverseFlowEndMilliseconds"] = 0
            record["biflowDirection"] = 0
            return record
        peer_flow = peer[0]
        record["reverseOctetDeltaCount"] = peer[1]
        record["reversePacketDeltaCount"] = peer[2]
        is_tcp = flow.key.protocol == TCP
        record["reverseTcpControlBits"] = peer_flow.tcp_flags & 0xFF if is_tcp else 0
        record["reverseFlowStartMilliseconds"] = peer[3]
        record["reverseFlowEndMilliseconds"] = peer[4]
        record["biflowDirection"] = 1 if flow.key.protocol == TCP else 0
        # The connection's interfaces: where it comes in and where it goes out.
        if flow.key.direction == EGRESS:
            record["ingressInterface"] = peer_flow.ifindex
        else:
            record["egressInterface"] = peer_flow.ifindex
        if self._retrans and flow.key.direction == INGRESS:
            record["RETRANSMITTED_OUT_PKTS"] = peer[6]
            record["RETRANSMITTED_OUT_BYTES"] = peer[7]
        process = peer_flow.process
        if self._process and process is not None and flow.process is None:
            # One socket owns both directions: the local end is the source when forward is egress.
            side = "SRC" if flow.key.direction == EGRESS else "DST"
            record[f"{side}_PROC_PID"] = process.pid
            record[f"{side}_PROC_NAME"] = process.comm
            record[f"{side}_PROC_UID"] = process.uid
        return record


# How each element is read from one cache export, as a Python expression over the locals of the
# generated row function: export, flow, key, egress, and those of the latency and process blocks.
# "{default}" is the row's value when the record would lack the key. Elements not listed here are
# never set by RecordBuilder either: they take the default.
_EXPRESSIONS = {
    "sourceIPv4Address": "key.src_addr",
    "destinationIPv4Address": "key.dst_addr",
    "sourceIPv6Address": "key.src_addr",
    "destinationIPv6Address": "key.dst_addr",
    "sourceTransportPort": "key.src_port",
    "destinationTransportPort": "key.dst_port",
    "protocolIdentifier": "key.protocol",
    "tcpControlBits": "(flow.tcp_flags & 255 if key.protocol == 6 else 0)",
    "octetDeltaCount": "export[1]",
    "packetDeltaCount": "export[2]",
    "flowStartMilliseconds": "export[3]",
    "flowEndMilliseconds": "export[4]",
    "flowEndReason": "export[5]",
    "flowDirection": "(1 if egress else 0)",
    "ingressInterface": "(0 if egress else flow.ifindex)",
    "egressInterface": "(flow.ifindex if egress else 0)",
    "icmpTypeCodeIPv4": "(key.dst_port if key.protocol == 1 else {default})",
    "icmpTypeCodeIPv6": "(key.dst_port if key.protocol == 58 else {default})",
    "RETRANSMITTED_IN_PKTS": "(export[6] if egress else 0)",
    "RETRANSMITTED_IN_BYTES": "(export[7] if egress else 0)",
    "RETRANSMITTED_OUT_PKTS": "0",
    "RETRANSMITTED_OUT_BYTES": "0",
    "CLIENT_NW_LATENCY_MS": "((client_us + 500) // 1000 if rtt else {default})",
    "SERVER_NW_LATENCY_MS": "((server_us + 500) // 1000 if rtt else {default})",
    "CLIENT_NW_DELAY_SEC": "(client_us // 1000000 if rtt else {default})",
    "CLIENT_NW_DELAY_USEC": "(client_us % 1000000 if rtt else {default})",
    "SERVER_NW_DELAY_SEC": "(server_us // 1000000 if rtt else {default})",
    "SERVER_NW_DELAY_USEC": "(server_us % 1000000 if rtt else {default})",
    "SRC_PROC_PID": "(proc.pid if proc is not None and egress else {default})",
    "SRC_PROC_NAME": "(proc.comm if proc is not None and egress else {default})",
    "SRC_PROC_UID": "(proc.uid if proc is not None and egress else {default})",
    "DST_PROC_PID": "(proc.pid if proc is not None and not egress else {default})",
    "DST_PROC_NAME": "(proc.comm if proc is not None and not egress else {default})",
    "DST_PROC_UID": "(proc.uid if proc is not None and not egress else {default})",
}
# Half the smoothed RTT goes to the side that is not local (see the module docstring).
# Half the smoothed RTT goes to the side that is not local (see the module docstring); which side
# is the client is local_is_client, inlined.
_LATENCY_BLOCK = """\
    tcp = flow.tcp
    rtt = tcp is not None and tcp.srtt_us
    if rtt:
        if egress:
            local, remote = key.src_port, key.dst_port
        else:
            local, remote = key.dst_port, key.src_port
        local_ephemeral = low <= local <= high
        remote_ephemeral = low <= remote <= high
        if local_ephemeral != remote_ephemeral:
            client = local_ephemeral
        else:
            client = local > remote
        if client:
            client_us, server_us = 0, tcp.srtt_us // 2
        else:
            client_us, server_us = tcp.srtt_us // 2, 0
"""
Layout = Sequence[tuple[str, object]]  # (record key, default) in row order


def _row_expression(layout: Layout, family: int, namespace: dict[str, object]) -> str:
    """The tuple expression of one family's row."""
    values = []
    for i, (name, default) in enumerate(layout):
        if type(default) in (int, str, bytes):
            constant = repr(default)  # a literal: cheaper than a global
        else:
            constant = f"d{family}_{i}"
            namespace[constant] = default
        expression = _EXPRESSIONS.get(name, "{default}")
        if name == "ipVersion":
            expression = str(family)
        values.append(expression.format(default=constant))
    return f"({', '.join(values)},)" if values else "()"


def compile_rows(layouts: dict[int, Layout], ephemeral: tuple[int, int]) -> Callable:
    """One function exports -> (IPv4 rows, IPv6 rows) for a session's layouts
    (ExportSession.row_layout), generated once: a single loop in which a row costs one tuple,
    with no dict, no call and no loop over fields. Its values are exactly those RecordBuilder
    puts in a uniflow record, or the default where it puts none. A family with an empty layout
    (one the protocol cannot carry) gets empty placeholder rows, for the session to count."""
    namespace: dict[str, object] = {"low": ephemeral[0], "high": ephemeral[1]}
    v4 = _row_expression(layouts.get(4, ()), 4, namespace)
    v6 = _row_expression(layouts.get(6, ()), 6, namespace)
    both = v4 + v6
    lines = [
        "def rows(exports):",
        "    v4 = []",
        "    v6 = []",
        "    add4 = v4.append",
        "    add6 = v6.append",
        "    for export in exports:",
        "        flow = export[0]",
        "        key = flow.key",
    ]
    block = []
    if "egress" in both or " if rtt " in both:
        block.append("egress = key.direction == 1")
    if " if rtt " in both:
        block += textwrap.dedent(_LATENCY_BLOCK).splitlines()
    if "proc is not None" in both:
        block.append("proc = flow.process")
    lines += [f"        {line}" for line in block]
    lines += [
        "        if len(key.src_addr) == 4:",
        f"            add4({v4})",
        "        else:",
        f"            add6({v6})",
        "    return v4, v6",
    ]
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<row builder>", "exec"), namespace)
    function = namespace["rows"]
    function.source = source  # type: ignore[attr-defined]
    return function  # type: ignore[return-value]


class RowBuilder:
    """Rows for one ExportSession straight from cache exports, per address family, in the order
    of the session's templates (`layouts`: ExportSession.row_layout of 4 and 6). Biflow records
    are built as dicts first (RFC 5103 pairing is not on the hot path) and converted once."""

    def __init__(
        self,
        layouts: dict[int, Layout],
        fields: Iterable[str],
        *,
        biflow: bool = False,
        ephemeral: tuple[int, int] | None = None,
    ) -> None:
        ephemeral = ephemeral or ephemeral_port_range()
        self.biflow = biflow
        self.layouts = layouts
        self._records = RecordBuilder(fields, biflow=biflow, ephemeral=ephemeral)
        self._rows = compile_rows(layouts, ephemeral)
        self._from_dict = {f: _from_dict(layout) for f, layout in layouts.items() if layout}

    def build(self, exports: Sequence[Export]) -> list[tuple[int, list]]:
        """(family, rows) for each family present: IPv4 first, each in input order."""
        if self.biflow:
            v4, v6 = [], []
            for export in exports:
                family = 4 if len(export[0].key.src_addr) == 4 else 6
                record = self._records._biflow_record(export)
                convert = self._from_dict.get(family)
                (v4 if family == 4 else v6).append(convert(record) if convert else ())
        else:
            v4, v6 = self._rows(exports)
        return [(family, rows) for family, rows in ((4, v4), (6, v6)) if rows]


def in_row_order(exports: Sequence[Export]) -> list[Export]:
    """Exports in the order RowBuilder.build gives their rows: IPv4 first."""
    v4 = [e for e in exports if len(e[0].key.src_addr) == 4]
    if len(v4) == len(exports):
        return list(exports)
    return v4 + [e for e in exports if len(e[0].key.src_addr) != 4]


def _from_dict(layout: Layout) -> Callable[[dict], tuple]:
    defaults = dict(layout)
    getter = itemgetter(*defaults)
    if len(defaults) == 1:
        return lambda record: (getter({**defaults, **record}),)
    return lambda record: getter({**defaults, **record})
