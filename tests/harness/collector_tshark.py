"""tshark 4.0.17's cflow dissector as an independent decoder.

Datagrams go into a pcap (written directly, or captured on `lo` with tcpdump from a live exporter),
tshark decodes it with `-d udp.port==N,cflow -T json`, and every record of every message comes back
keyed by IE name, with the expert warnings ("Unexpected flow sequence", "no template found") and
malformed-packet markers. Templates are remembered only within one capture and per UDP stream, so
a capture must hold the templates of the data it contains.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import re
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tests.harness.collector_common import (
    LOOPBACK,
    CollectorError,
    Daemon,
    Flow,
    UdpSink,
    free_udp_port,
    pack_address,
    run_tool,
    wait_until,
    write_pcap,
)
from tests.harness.collector_tshark_raw import has_raw_fields, raw_records, tshark_timeout_s


def _int(text: str) -> int:
    return int(text, 0)


def _string(text: str) -> str:
    return text


def _address(text: str) -> bytes:
    return pack_address(text)


# tshark field -> (IE name, converter). Times are handled separately (absolute vs relative).
TSHARK_FIELDS: dict[str, tuple[str, Callable[[str], object]]] = {
    "cflow.srcaddr": ("sourceIPv4Address", _address),
    "cflow.dstaddr": ("destinationIPv4Address", _address),
    "cflow.srcaddrv6": ("sourceIPv6Address", _address),
    "cflow.dstaddrv6": ("destinationIPv6Address", _address),
    "cflow.nexthop": ("ipNextHopIPv4Address", _address),
    "cflow.srcport": ("sourceTransportPort", _int),
    "cflow.dstport": ("destinationTransportPort", _int),
    "cflow.protocol": ("protocolIdentifier", _int),
    "cflow.tcpflags": ("tcpControlBits", _int),
    "cflow.tos": ("ipClassOfService", _int),
    "cflow.ip_version": ("ipVersion", _int),
    "cflow.octets": ("octetDeltaCount", _int),
    "cflow.packets": ("packetDeltaCount", _int),
    "cflow.inputint": ("ingressInterface", _int),
    "cflow.outputint": ("egressInterface", _int),
    "cflow.direction": ("flowDirection", _int),
    "cflow.flow_end_reason": ("flowEndReason", _int),
    "cflow.biflow_direction": ("biflowDirection", _int),
    "cflow.icmp_type_code_ipv4": ("icmpTypeCodeIPv4", _int),
    "cflow.icmp_ipv6_type": ("icmp6.type", _int),
    "cflow.icmp_ipv6_code": ("icmp6.code", _int),
    "cflow.sampling_interval": ("samplingInterval", _int),
    "cflow.srcas": ("bgpSourceAsNumber", _int),
    "cflow.dstas": ("bgpDestinationAsNumber", _int),
    "cflow.srcmask": ("sourceIPv4PrefixLength", _int),
    "cflow.dstmask": ("destinationIPv4PrefixLength", _int),
    "cflow.pie.ntop.retransmitted_in_pkts": ("RETRANSMITTED_IN_PKTS", _int),
    "cflow.pie.ntop.retransmitted_out_pkts": ("RETRANSMITTED_OUT_PKTS", _int),
    "cflow.pie.ntop.retransmitted_in_bytes": ("RETRANSMITTED_IN_BYTES", _int),
    "cflow.pie.ntop.retransmitted_out_bytes": ("RETRANSMITTED_OUT_BYTES", _int),
    "cflow.pie.ntop.client_nw_latency_ms": ("CLIENT_NW_LATENCY_MS", _int),
    "cflow.pie.server_nw_latency_ms": ("SERVER_NW_LATENCY_MS", _int),
    "cflow.pie.ntop.appl_latency_ms": ("APPL_LATENCY_MS", _int),
    "cflow.pie.ntop.src_proc_id": ("SRC_PROC_PID", _int),
    "cflow.pie.ntop.src_proc_name": ("SRC_PROC_NAME", _string),
    "cflow.pie.ntop.src_proc_uid": ("SRC_PROC_UID", _int),
    "cflow.pie.ntop.src_proc_user_name": ("SRC_PROC_USER_NAME", _string),
    "cflow.pie.ntop.dst_proc_pid": ("DST_PROC_PID", _int),
    "cflow.pie.ntop.dst_proc_name": ("DST_PROC_NAME", _string),
    "cflow.pie.ntop.dst_proc_uid": ("DST_PROC_UID", _int),
    "cflow.pie.ntop.dst_proc_user_name": ("DST_PROC_USER_NAME", _string),
    # The legacy nProbe v9 latency ids 57554-57557 are ntop 82-85, which tshark 4.0 names by
    # their current meaning (throughput): same bits, other label.
    "cflow.pie.ntop.src_to_dst_max_throughput": ("CLIENT_NW_DELAY_SEC", _int),
    "cflow.pie.ntop.src_to_dst_min_throughput": ("CLIENT_NW_DELAY_USEC", _int),
    "cflow.pie.ntop.src_to_dst_avg_throughput": ("SERVER_NW_DELAY_SEC", _int),
    "cflow.pie.ntop.dst_to_src_max_throughput": ("SERVER_NW_DELAY_USEC", _int),
    # Options data (exporter statistics).
    "cflow.packetsexp": ("exportedMessageTotalCount", _int),
    "cflow.flowsexp": ("exportedFlowRecordTotalCount", _int),
    "cflow.octetsexp": ("exportedOctetTotalCount", _int),
    "cflow.flow_exporter": ("exportingProcessId", _int),
    "cflow.notsent_flows": ("notSentFlowTotalCount", _int),
    "cflow.notsent_packets": ("notSentPacketTotalCount", _int),
    "cflow.notsent_octets": ("notSentOctetTotalCount", _int),
}
_ABSOLUTE_TIMES = {
    "cflow.abstimestart": "flowStartMilliseconds",
    "cflow.abstimeend": "flowEndMilliseconds",
    "cflow.sys_init_time": "systemInitTimeMilliseconds",
}
_RELATIVE_TIMES = {
    "cflow.timestart": "flowStartMilliseconds",
    "cflow.timeend": "flowEndMilliseconds",
}
_ABS_TIME = re.compile(r"^(\w{3}\s+\d+, \d{4} \d\d:\d\d:\d\d)(?:\.(\d+))? UTC$")


def parse_absolute_time(text: str) -> int:
    """tshark's "Nov 25, 2026 18:37:20.113000000 UTC" (TZ=UTC) -> epoch milliseconds."""
    match = _ABS_TIME.match(text.strip())
    if not match:
        raise CollectorError(f"tshark time not understood: {text!r}")
    seconds = calendar.timegm(time.strptime(match.group(1), "%b %d, %Y %H:%M:%S"))
    fraction = (match.group(2) or "0").ljust(3, "0")
    return seconds * 1000 + int(fraction[:3])


def _seconds_ms(text: str) -> int:
    return int(Decimal(text) * 1000)


@dataclass
class TsharkResult:
    flows: list[Flow] = field(default_factory=list)
    options: list[Flow] = field(default_factory=list)
    expert: list[str] = field(default_factory=list)
    malformed: int = 0
    messages: int = 0

    def sequence_errors(self) -> int:
        return sum("Unexpected flow sequence" in m for m in self.expert)

    def missing_templates(self) -> int:
        return sum("no template found" in m for m in self.expert)


def _first_wins(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """tshark's JSON repeats keys (cflow.padding, ip.addr): keep the first of each."""
    out: dict[str, object] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _walk(node: object, result: TsharkResult) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_ws.expert.message":
                result.expert.append(str(value))
            elif key == "_ws.malformed":
                result.malformed += 1
            else:
                _walk(value, result)


def _record(raw: dict, header: dict) -> Flow:
    """One "Flow N"/"pdu N/M" object -> IE-keyed flow; v5/v9 relative times made absolute from
    the header (export time - sysUptime + First/Last), as the collectors do."""
    flow: Flow = {}
    _fields(raw, header, flow)
    # tshark splits icmpTypeCodeIPv6 (139) into type and code.
    if "icmp6.type" in flow or "icmp6.code" in flow:
        icmp_type, icmp_code = flow.pop("icmp6.type", 0), flow.pop("icmp6.code", 0)
        flow["icmpTypeCodeIPv6"] = int(icmp_type) << 8 | int(icmp_code)  # type: ignore[call-overload]
    return flow


def _fields(raw: dict, header: dict, flow: Flow) -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            if key.endswith("_tree"):  # times sit in cflow.timedelta_tree
                _fields(value, header, flow)
        elif key in TSHARK_FIELDS:
            name, convert = TSHARK_FIELDS[key]
            flow[name] = convert(value)
        elif key in _ABSOLUTE_TIMES:
            flow[_ABSOLUTE_TIMES[key]] = parse_absolute_time(value)
        elif key in _RELATIVE_TIMES and "boot_ms" in header:
            flow[_RELATIVE_TIMES[key]] = header["boot_ms"] + _seconds_ms(value)


def _header(cflow: dict) -> dict:
    header = {"version": int(cflow.get("cflow.version", 0))}
    stamp = cflow.get("cflow.timestamp_tree", {})
    if "cflow.sysuptime" in cflow:
        export_ms = int(stamp.get("cflow.unix_secs", 0)) * 1000
        export_ms += int(stamp.get("cflow.unix_nsecs", 0)) // 1_000_000
        header["boot_ms"] = export_ms - _seconds_ms(cflow["cflow.sysuptime"])
    return header


def parse_tshark_json(text: str, raw: Sequence[dict] = ()) -> TsharkResult:
    """`raw`: per record in document order, the elements tshark shows without a name
    (collector_tshark_raw), merged into that record."""
    result = TsharkResult()
    shown = 0  # records so far, in document order
    packets = json.loads(text, object_pairs_hook=_first_wins) if text.strip() else []
    options_templates: set[int] = set()
    for packet in packets:
        layers = packet["_source"]["layers"]
        _walk(layers, result)
        cflows = layers.get("cflow")
        if cflows is None:
            continue
        for cflow in cflows if isinstance(cflows, list) else [cflows]:
            result.messages += 1
            header = _header(cflow)
            for key, value in cflow.items():
                if key.startswith("pdu "):  # v5 record
                    result.flows.append(_record(value, header))
                    shown += 1
                elif key.startswith(("Set ", "FlowSet ")) and isinstance(value, dict):
                    set_id = int(value.get("cflow.flowset_id", 0))
                    if set_id in (1, 3):  # options templates: remember their ids
                        options_templates.update(
                            int(t["cflow.template_id"])
                            for name, t in value.items()
                            if isinstance(t, dict) and "cflow.template_id" in t
                        )
                    for name, record in value.items():
                        if name.startswith("Flow ") and isinstance(record, dict):
                            target = result.options if set_id in options_templates else result.flows
                            target.append(_record(record, header))
                            if shown < len(raw):
                                target[-1].update(raw[shown])
                            shown += 1
    return result


def decode_pcap(pcap: Path, port: int) -> TsharkResult:
    text = run_tool(
        ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-T", "json"],
        timeout=tshark_timeout_s(pcap),
        env={"TZ": "UTC"},
    )
    # Elements tshark 4.0 cannot name need a second pass, only when the capture holds some.
    raw = raw_records(pcap, port) if has_raw_fields(text) else []
    return parse_tshark_json(text, raw)


def decode_with_tshark(datagrams: Sequence[bytes], ip_version: int = 4) -> TsharkResult:
    """One-shot: write the datagrams as one UDP stream into a pcap and decode it."""
    host = LOOPBACK[ip_version]
    with tempfile.TemporaryDirectory(prefix="fb-tshark-") as tmp:
        pcap = Path(tmp) / "export.pcap"
        write_pcap(pcap, datagrams, src=(host, 40000), dst=(host, 2055))
        return decode_pcap(pcap, 2055)


def pcap_packet_count(path: Path) -> int:
    """Packets in a classic pcap file (tcpdump -w), counted from the record headers."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    offset, count = 24, 0
    while offset + 16 <= len(data):
        caplen = int.from_bytes(data[offset + 8 : offset + 12], "little")
        offset += 16 + caplen
        if offset <= len(data):
            count += 1
    return count


class TsharkCapture:
    """Capture a live exporter on `lo` (tcpdump, immediate mode), then decode with tshark.

    By default a UdpSink binds a free port and swallows the datagrams (so the exporter sees no
    ICMP port-unreachable); with `port=` it watches a real collector's port instead, so tshark
    and that collector decode the very same packets."""

    def __init__(
        self,
        ip_version: int = 4,
        bind: bool = True,
        workdir: Path | None = None,
        port: int | None = None,
    ):
        """`port`: watch the traffic to a collector that already listens there (no bind)."""
        self.host = LOOPBACK[ip_version]
        self.port = port or free_udp_port(self.host)
        bind = bind and port is None
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fb-capture-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.pcap = self.workdir / "capture.pcap"
        self.daemon = Daemon(
            [
                "tcpdump",
                "-i",
                "lo",
                "-n",
                "-U",
                "--immediate-mode",
                # The ring holds buffer/snaplen packets: a 256 KiB default snaplen leaves room
                # for a handful only, and a burst of exports is dropped.
                "-s",
                "65600",
                "-B",
                "65536",
                "-w",
                str(self.pcap),
                "udp",
                "port",
                str(self.port),
            ],
            self.workdir / "tcpdump.log",
        )
        self._sink = UdpSink(self.host, self.port, keep=False) if bind else None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> TsharkCapture:
        self.daemon.start()
        wait_until(
            lambda: "listening on" in self.daemon.log() or not self.daemon.running(),
            10,
            "tcpdump to listen",
        )
        self.daemon.check_alive("tcpdump")
        if self._sink is not None:
            self._sink.start()
        return self

    def stop(self, expect_packets: int | None = None, timeout: float = 10.0) -> None:
        if self.daemon.running():
            if expect_packets is not None:
                # On timeout, stop anyway: decoding and kernel_drops() show what is missing.
                with contextlib.suppress(CollectorError):
                    wait_until(
                        lambda: pcap_packet_count(self.pcap) >= expect_packets,
                        timeout,
                        f"tcpdump to write {expect_packets} packets",
                    )
            else:
                time.sleep(0.2)
        self.daemon.stop(signal.SIGINT)
        if self._sink is not None:
            self._sink.stop()
            self._sink = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> TsharkCapture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kernel_drops(self) -> int:
        """Packets tcpdump lost (its exit summary): a capture with drops proves nothing."""
        match = re.search(r"(\d+) packets? dropped by kernel", self.daemon.log())
        return int(match.group(1)) if match else 0

    def result(self) -> TsharkResult:
        return decode_pcap(self.pcap, self.port)

    def flows(self) -> list[Flow]:
        return self.result().flows

    def sequence_errors(self) -> int:
        return self.result().sequence_errors()
