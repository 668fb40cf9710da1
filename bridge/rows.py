"""Rows for an ExportSession straight from cache exports: the hot path of the agent.

A row is a tuple in template order, holding exactly what bridge.records.RecordBuilder puts in a
uniflow record (or the layout's default where it puts none); compile_rows generates one function
per session so that a row costs one tuple and no per-field call. Where the session's records do
not depend on the batch (ExportSession.direct_pack: IPFIX), the generated function passes the
same values straight to the record's pack instead, and no tuple is made: the row is its record's
bytes (measured: ~15% of the pipeline's CPU time for the standard profile).
tests/agent/test_rows.py checks all paths agree byte for byte.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter

from bridge.cache import Export
from bridge.records import CommandLines, ContainerIds, RecordBuilder, ephemeral_port_range
from ebpf.observation import FlowKey
from ipfix.packer import FAST_PATH_ERRORS, Packed

# How each element is read from one cache export, as a Python expression over the locals of the
# generated row function: the export's items (unpacked by the loop, as bridge.cache.Export lists
# them), key, egress, and those of the latency and process blocks.
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
    "octetDeltaCount": "octets",
    "packetDeltaCount": "packets",
    "flowStartMilliseconds": "start_ms",
    "flowEndMilliseconds": "end_ms",
    "flowEndReason": "reason",
    "flowDirection": "(1 if egress else 0)",
    "ingressInterface": "(0 if egress else flow.ifindex)",
    "egressInterface": "(flow.ifindex if egress else 0)",
    "icmpTypeCodeIPv4": "(key.dst_port if key.protocol == 1 else {default})",
    "icmpTypeCodeIPv6": "(key.dst_port if key.protocol == 58 else {default})",
    "RETRANSMITTED_IN_PKTS": "(retrans if egress else 0)",
    "RETRANSMITTED_IN_BYTES": "(retrans_bytes if egress else 0)",
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
    "SRC_PROC_CONTAINER_ID": "(container if container and egress else {default})",
    "DST_PROC_CONTAINER_ID": "(container if container and not egress else {default})",
    "SRC_PROC_CMDLINE": "(cmdline if cmdline and egress else {default})",
    "DST_PROC_CMDLINE": "(cmdline if cmdline and not egress else {default})",
}
_CONTAINER_ELEMENTS = ("SRC_PROC_CONTAINER_ID", "DST_PROC_CONTAINER_ID")
_CMDLINE_ELEMENTS = ("SRC_PROC_CMDLINE", "DST_PROC_CMDLINE")
# Half the smoothed RTT goes to the side that is not local (see bridge.records); which side
# is the client is bridge.records.local_is_client, inlined.
_LATENCY_BLOCK = """\
    tcp = flow.tcp
    rtt = tcp is not None and tcp.srtt_us
    if rtt:
        client = flow.local_initiated
        if client is None:
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


def _row_expression(
    layout: Layout,
    family: int,
    namespace: dict[str, object],
    containers: bool,
    command_lines: bool = False,
) -> list[str]:
    """The values of one family's row, as Python expressions."""
    values = []
    for i, (name, default) in enumerate(layout):
        if type(default) in (int, str, bytes):
            constant = repr(default)  # a literal: cheaper than a global
        else:
            constant = f"d{family}_{i}"
            namespace[constant] = default
        expression = _EXPRESSIONS.get(name, "{default}")
        if name in _CONTAINER_ELEMENTS and not containers:
            expression = "{default}"
        elif name in _CMDLINE_ELEMENTS and not command_lines:
            expression = "{default}"  # not asked for: /proc is never read
        elif name == "ipVersion":
            expression = str(family)
        values.append(expression.format(default=constant))
    return values


def compile_rows(
    layouts: dict[int, Layout],
    ephemeral: tuple[int, int],
    container_ids: ContainerIds | None = None,
    command_lines: CommandLines | None = None,
    packs: dict[int, Callable[..., bytes] | None] | None = None,
) -> Callable:
    """One function exports -> (IPv4 rows, IPv6 rows) for a session's layouts
    (ExportSession.row_layout), generated once: a single loop in which a row costs one tuple,
    with no dict, no call and no loop over fields. Its values are exactly those RecordBuilder
    puts in a uniflow record, or the default where it puts none. A family with an empty layout
    (one the protocol cannot carry) gets empty placeholder rows, for the session to count.
    A family with a function in `packs` (ExportSession.direct_pack) gets its rows packed by it,
    as a `Packed` list; the function raises FAST_PATH_ERRORS on a value the pack refuses."""
    namespace: dict[str, object] = {
        "low": ephemeral[0],
        "high": ephemeral[1],
        "container_ids": container_ids,
        "command_lines": command_lines,
        "Packed": Packed,
    }
    containers = container_ids is not None
    cmdlines = command_lines is not None
    rows, lists = {}, {}  # per family: the row's expression, the list that collects rows
    for family in (4, 6):
        values = _row_expression(layouts.get(family, ()), family, namespace, containers, cmdlines)
        pack = (packs or {}).get(family)
        if pack is not None and values:
            namespace[f"pack{family}"] = pack
            rows[family], lists[family] = f"pack{family}({', '.join(values)})", "Packed()"
        else:
            rows[family] = f"({', '.join(values)},)" if values else "()"
            lists[family] = "[]"
    v4, v6 = rows[4], rows[6]
    both = v4 + v6
    lines = [
        "def rows(exports):",
        f"    v4 = {lists[4]}",
        f"    v6 = {lists[6]}",
        "    add4 = v4.append",
        "    add6 = v6.append",
        "    for flow, octets, packets, start_ms, end_ms, reason, retrans, retrans_bytes, _ in (",
        "        exports",
        "    ):",
        "        key = flow.key",
    ]
    block = []
    if "egress" in both or " if rtt " in both:
        block.append("egress = key.direction == 1")
    if " if rtt " in both:
        block += textwrap.dedent(_LATENCY_BLOCK).splitlines()
    if "proc is not None" in both or "container" in both or "cmdline" in both:
        block.append("proc = flow.process")
    if "container" in both:
        block.append("container = container_ids(proc.cgroup_id) if proc is not None else ''")
    if "cmdline" in both:
        block.append("cmdline = command_lines(proc.pid, proc.comm) if proc is not None else ''")
    lines += [f"        {line}" for line in block]
    lines += [
        "        if len(key.src_addr) == 4:",
        f"            add4({v4})",
        "        else:",
        f"            add6({v6})",
        "    return v4, v6",
    ]
    source = _key_fields_as_locals("\n".join(lines) + "\n")
    exec(compile(source, "<row builder>", "exec"), namespace)
    function = namespace["rows"]
    function.source = source  # type: ignore[attr-defined]
    return function  # type: ignore[return-value]


def _key_fields_as_locals(source: str) -> str:
    """The row function with the FlowKey unpacked once per export into locals (key_src_addr,
    ...): reading a NamedTuple field by name costs a descriptor call each time, ~8 of them a
    row, where one unpack of the tuple costs about one."""
    fields = FlowKey._fields
    for field in fields:
        source = source.replace(f"key.{field}", f"key_{field}")
    unpack = f"        {', '.join(f'key_{field}' for field in fields)} = flow.key\n"
    return source.replace("        key = flow.key\n", unpack)


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
        container_ids: ContainerIds | None = None,
        command_lines: CommandLines | None = None,
        packs: dict[int, Callable[..., bytes] | None] | None = None,
    ) -> None:
        """`packs`: ExportSession.direct_pack of 4 and 6, to build rows as packed records."""
        ephemeral = ephemeral or ephemeral_port_range()
        self.biflow = biflow
        self.layouts = layouts
        self._records = RecordBuilder(
            fields,
            biflow=biflow,
            ephemeral=ephemeral,
            container_ids=container_ids,
            command_lines=command_lines,
        )
        self._rows = compile_rows(layouts, ephemeral, container_ids, command_lines)
        self._packed_rows = (
            compile_rows(layouts, ephemeral, container_ids, command_lines, packs)
            if packs and any(packs.values())
            else None
        )
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
        elif self._packed_rows is not None:
            try:
                v4, v6 = self._packed_rows(exports)
            except FAST_PATH_ERRORS:
                # A value the struct refuses: tuples, which the session's careful path fixes
                # or refuses value by value.
                v4, v6 = self._rows(exports)
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
