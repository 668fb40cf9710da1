"""pmacct nfacctd 1.7.7 as an independent decoder: print plugin, JSON lines, custom primitives.

Sequence checking is on (`nfacctd_disable_checks: false`): every gap or jump is an INFO line
"expecting flow 'X' but received 'Y'" in the log. Built-in primitives give the 5-tuple, counters,
flags, ToS, interfaces and times; everything else (direction, end reason, ntop PEN elements,
legacy nProbe latency ids) is read through `aggregate_primitives`, which match an element by id
AND length: an element sent at another length than the one configured here reads as 0, exactly
as it would for a pmacct user with that configuration.
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from tests.harness.collector_common import (
    LOOPBACK,
    CollectorError,
    Daemon,
    Flow,
    free_udp_port,
    send_datagrams,
    set_address,
    udp_drops,
    wait_udp_bound,
    wait_udp_drained,
    wait_until,
)

NTOP_PEN = 35632
NTOP_V9_BASE = 57472


class Primitive:
    """One custom primitive: the IE it stands for, where pmacct finds it, how long and how shown.

    `ipfix_id`/`v9_id`: "<id>" or "<PEN>:<id>"; None when the element does not exist there.
    `length`: bytes, or "vlen" (strings: pmacct's vlen also matches fixed-length v9 strings).
    """

    def __init__(
        self,
        ie_name: str,
        ipfix_id: str | None,
        v9_id: str | None,
        length: int | str,
        semantics: str = "u_int",
    ):
        self.ie_name = ie_name
        self.ipfix_id = ipfix_id
        self.v9_id = v9_id
        self.length = length
        self.semantics = semantics

    def lines(self) -> list[str]:
        if self.ipfix_id == self.v9_id:
            return [self._line(self.ie_name, self.ipfix_id)]
        out = []
        if self.ipfix_id:
            out.append(self._line(f"{self.ie_name}_ipfix", self.ipfix_id))
        if self.v9_id:
            out.append(self._line(f"{self.ie_name}_v9", self.v9_id))
        return out

    def names(self) -> list[str]:
        return [line.split()[0].removeprefix("name=") for line in self.lines()]

    def _line(self, name: str, field_type: str | None) -> str:
        return (
            f"name={name}\tfield_type={field_type}\tlen={self.length}\tsemantics={self.semantics}"
        )


def _ntop(name: str, n: int, length: int | str = 4, semantics: str = "u_int") -> Primitive:
    return Primitive(name, f"{NTOP_PEN}:{n}", str(NTOP_V9_BASE + n), length, semantics)


# Lengths follow collectors.md section 3: what the exporter is expected to send.
DEFAULT_PRIMITIVES: tuple[Primitive, ...] = (
    Primitive("flowDirection", "61", "61", 1),
    Primitive("flowEndReason", "136", "136", 1),
    Primitive("ipVersion", "60", "60", 1),
    Primitive("icmpTypeCodeIPv4", "32", "32", 2),
    Primitive("icmpTypeCodeIPv6", "139", "139", 2),
    _ntop("RETRANSMITTED_IN_PKTS", 109),
    _ntop("RETRANSMITTED_OUT_PKTS", 110),
    _ntop("RETRANSMITTED_IN_BYTES", 127),
    _ntop("RETRANSMITTED_OUT_BYTES", 128),
    _ntop("CLIENT_NW_LATENCY_MS", 123),
    _ntop("SERVER_NW_LATENCY_MS", 124),
    _ntop("APPL_LATENCY_MS", 125),
    _ntop("SRC_PROC_PID", 168),
    _ntop("SRC_PROC_NAME", 169, "vlen", "str"),
    _ntop("SRC_PROC_UID", 425),
    _ntop("DST_PROC_PID", 375),
    _ntop("DST_PROC_NAME", 376, "vlen", "str"),
    _ntop("DST_PROC_UID", 426),
    _ntop("SRC_PROC_USER_NAME", 372, "vlen", "str"),
    _ntop("DST_PROC_USER_NAME", 377, "vlen", "str"),
    _ntop("SRC_PROC_CONTAINER_ID", 558, "vlen", "str"),
    _ntop("DST_PROC_CONTAINER_ID", 559, "vlen", "str"),
    _ntop("SRC_PROC_CMDLINE", 556, "vlen", "str"),
    _ntop("DST_PROC_CMDLINE", 557, "vlen", "str"),
    # Legacy nProbe v9 ids nfdump shows as latency (v9 only).
    Primitive("CLIENT_NW_DELAY_SEC", None, "57554", 4),
    Primitive("CLIENT_NW_DELAY_USEC", None, "57555", 4),
    Primitive("SERVER_NW_DELAY_SEC", None, "57556", 4),
    Primitive("SERVER_NW_DELAY_USEC", None, "57557", 4),
)

BUILTIN_AGGREGATE = (
    "src_host,dst_host,src_port,dst_port,proto,tcpflags,tos,in_iface,out_iface,"
    "timestamp_start,timestamp_end,export_proto_version,export_proto_sysid"
)

_BUILTIN_INT = {
    "port_src": "sourceTransportPort",
    "port_dst": "destinationTransportPort",
    "ip_proto": "protocolIdentifier",
    "tcp_flags": "tcpControlBits",
    "tos": "ipClassOfService",
    "iface_in": "ingressInterface",
    "iface_out": "egressInterface",
    "packets": "packetDeltaCount",
    "bytes": "octetDeltaCount",
    "export_proto_version": "pmacct.version",
    "export_proto_sysid": "pmacct.sysid",
}


def parse_json_lines(text: str, primitives: Sequence[Primitive]) -> list[Flow]:
    """Print-plugin JSON lines -> flows keyed by IE names (times in epoch ms)."""
    by_name = {name.lower(): p for p in primitives for name in p.names()}  # pmacct lowercases
    flows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        flow: Flow = {}
        version = int(row.get("export_proto_version", 0))
        for key, value in row.items():
            if key in _BUILTIN_INT:
                flow[_BUILTIN_INT[key]] = int(value)
            elif key in ("ip_src", "ip_dst"):
                set_address(flow, 0 if key == "ip_src" else 1, value)
            elif key in ("timestamp_start", "timestamp_end"):
                ie = "flowStartMilliseconds" if key == "timestamp_start" else "flowEndMilliseconds"
                flow[ie] = int(Decimal(value) * 1000)
            elif key in by_name:
                primitive = by_name[key]
                wrong_protocol = (key.endswith("_ipfix") and version != 10) or (
                    key.endswith("_v9") and version != 9
                )
                if wrong_protocol:  # the other protocol's twin of this element reads 0 here
                    continue
                ie = primitive.ie_name
                flow[ie] = value if primitive.semantics == "str" else int(value)
        flows.append(flow)
    return flows


class Nfacctd:
    """nfacctd on loopback with a print plugin writing JSON lines to a private temp dir."""

    def __init__(
        self,
        ip_version: int = 4,
        primitives: Sequence[Primitive] = DEFAULT_PRIMITIVES,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        socket_buffer: int | None = None,
    ):
        """port: bind there, default a free one; socket_buffer: the socket's receive buffer in
        bytes (nfacctd_pipe_size), default the kernel's."""
        self.host = LOOPBACK[ip_version]
        self.port = port or free_udp_port(self.host)
        self.socket_buffer = socket_buffer
        self.primitives = tuple(primitives)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fb-nfacctd-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.output = self.workdir / "flows.json"
        self.log_path = self.workdir / "nfacctd.log"
        config = self._write_config()
        self.daemon = Daemon(["nfacctd", "-f", str(config)], self.workdir / "nfacctd.stdout")
        self.drops = 0
        self._stopped = False

    def _write_config(self) -> Path:
        primitives_file = self.workdir / "primitives.lst"
        primitives_file.write_text(
            "\n".join(line for p in self.primitives for line in p.lines()) + "\n"
        )
        custom = ",".join(name for p in self.primitives for name in p.names())
        config = self.workdir / "nfacctd.conf"
        config.write_text(
            "\n".join(
                [
                    "daemonize: false",
                    f"nfacctd_ip: {self.host}",
                    f"nfacctd_port: {self.port}",
                    "nfacctd_disable_checks: false",
                    "nfacctd_time_new: false",
                    f"aggregate_primitives: {primitives_file}",
                    "plugins: print[out]",
                    f"aggregate[out]: {BUILTIN_AGGREGATE},{custom}",
                    "print_output[out]: json",
                    "print_num_protos[out]: true",
                    f"print_output_file[out]: {self.output}",
                    "print_output_file_append[out]: true",
                    "print_refresh_time[out]: 1",
                    # The default (16411 aggregates per refresh) overflows when one nfacctd gets
                    # IPFIX and v9 copies of ~8000 records a second: records vanish, no error.
                    "print_cache_entries[out]: 65521",
                    "timestamps_since_epoch: true",
                    f"logfile: {self.log_path}",
                    *([f"nfacctd_pipe_size: {self.socket_buffer}"] if self.socket_buffer else []),
                    "",
                ]
            )
        )
        return config

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> Nfacctd:
        self.daemon.start()
        wait_udp_bound(self.port)
        # Data that arrives before the print plugin's first purge cycle sits in its cache until
        # exit (seen with 1.7.7), so the collector is ready only once one cycle has run.
        wait_until(lambda: self._purges() >= 1, 10, "nfacctd's print plugin to be ready")
        self.daemon.check_alive("nfacctd")
        return self

    def _purges(self) -> int:
        return self.log().count("Purging cache - END")

    def send(self, datagrams: Sequence[bytes]) -> int:
        return send_datagrams(datagrams, self.host, self.port)

    def _lines_written(self) -> int:
        try:
            return self.output.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def stop(self, expect_flows: int | None = None, timeout: float = 10.0) -> None:
        """Let nfacctd read its queue, wait until the print plugin has written `expect_flows`
        lines (or, not knowing, two purge cycles), then SIGINT."""
        if self._stopped:
            return
        self._stopped = True
        if self.daemon.running():
            try:
                wait_udp_drained(self.port)
                if expect_flows is not None:
                    wait_until(
                        lambda: self._lines_written() >= expect_flows,
                        timeout,
                        f"nfacctd to print {expect_flows} flows",
                    )
                else:  # two purge cycles after the last datagram was read: all of it is out
                    purges = self._purges()
                    wait_until(lambda: self._purges() >= purges + 2, timeout, "nfacctd purges")
            except CollectorError:
                pass  # the comparison shows what is missing, with the log for the reason
            self.drops = udp_drops(self.port)
        self.daemon.stop(signal.SIGINT)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Nfacctd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flows(self) -> list[Flow]:
        try:
            text = self.output.read_text()
        except FileNotFoundError:
            return []
        # The print plugin may be mid-line: only what ends in a newline is written.
        return parse_json_lines(text[: text.rfind("\n") + 1], self.primitives)

    def sequence_messages(self) -> list[str]:
        return re.findall(r"expecting flow '\d+' but received '\d+'[^\n]*", self.log())

    def sequence_errors(self) -> int:
        return len(self.sequence_messages())

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self.daemon.log()


def decode_with_nfacctd(
    datagrams: Sequence[bytes],
    ip_version: int = 4,
    expect_flows: int | None = None,
    primitives: Sequence[Primitive] = DEFAULT_PRIMITIVES,
) -> tuple[list[Flow], int]:
    """One-shot: send the datagrams to a fresh nfacctd; return (flows, sequence errors)."""
    with Nfacctd(ip_version, primitives) as nfacctd:
        nfacctd.send(datagrams)
        nfacctd.stop(expect_flows)
        if nfacctd.drops:
            raise CollectorError(f"nfacctd socket dropped {nfacctd.drops} datagrams")
        return nfacctd.flows(), nfacctd.sequence_errors()
