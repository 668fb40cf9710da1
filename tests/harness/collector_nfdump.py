"""nfcapd + nfdump (nfdump 1.7.1) as an independent decoder.

`nfdump -o raw` is the one output that keeps millisecond times, the end reason, the direction
and the latency extension, so it is what we parse ("key = value" lines per "Flow Record:").
"""

from __future__ import annotations

import contextlib
import re
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
    run_tool,
    send_datagrams,
    set_address,
    udp_drops,
    wait_udp_bound,
    wait_udp_drained,
)

# nfdump raw key -> (IE name, converter). "first"/"last" are epoch ms followed by a date.
_FIRST_TOKEN_INT = {
    "first": "flowStartMilliseconds",
    "last": "flowEndMilliseconds",
    "proto": "protocolIdentifier",
    "src port": "sourceTransportPort",
    "dst port": "destinationTransportPort",
    "src tos": "ipClassOfService",
    "in packets": "packetDeltaCount",
    "in bytes": "octetDeltaCount",
    "out packets": "postPacketDeltaCount",
    "out bytes": "postOctetDeltaCount",
    "input": "ingressInterface",
    "output": "egressInterface",
    "direction": "flowDirection",
    "src mask": "sourceIPv4PrefixLength",
    "dst mask": "destinationIPv4PrefixLength",
}
_FIRST_TOKEN_HEX = {
    "tcp flags": "tcpControlBits",
    "end reason": "flowEndReason",
    "biFlow Dir": "biflowDirection",
}
# Latency columns fed by the legacy nProbe v9 ids 57554-57559, in microseconds.
NFDUMP_LATENCY_KEYS = {
    "cli latency": "nfdump.client_latency_us",
    "srv latency": "nfdump.server_latency_us",
    "app latency": "nfdump.application_latency_us",
}
_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*=\s*(.*?)\s*$")


def parse_raw(text: str) -> list[Flow]:
    """Parse `nfdump -o raw` output into flows keyed by IE names."""
    flows: list[Flow] = []
    flow: Flow | None = None
    for line in text.splitlines():
        if line.startswith("Flow Record:"):
            flow = {}
            flows.append(flow)
            continue
        match = _LINE.match(line)
        if flow is None or not match:
            continue
        key, value = match.groups()
        token = value.split()[0] if value else ""
        if key in _FIRST_TOKEN_INT:
            flow[_FIRST_TOKEN_INT[key]] = int(token)
        elif key in _FIRST_TOKEN_HEX:
            flow[_FIRST_TOKEN_HEX[key]] = int(token, 16)
        elif key == "src addr":
            set_address(flow, 0, token)
        elif key == "dst addr":
            set_address(flow, 1, token)
        elif key == "ICMP":
            icmp_type, icmp_code = (int(part) for part in token.split("."))
            flow["nfdump.icmp"] = icmp_type << 8 | icmp_code
        elif key in NFDUMP_LATENCY_KEYS:
            flow[NFDUMP_LATENCY_KEYS[key]] = int(Decimal(token) * 1000)
        elif key == "Flags":
            flow["nfdump.version"] = _version_from_flags(value)
    for flow in flows:
        if "nfdump.icmp" in flow:
            version = 6 if "sourceIPv6Address" in flow else 4
            flow[f"icmpTypeCodeIPv{version}"] = flow.pop("nfdump.icmp")
        if "sourceIPv6Address" in flow:
            flow.pop("sourceIPv4PrefixLength", None)
            flow.pop("destinationIPv4PrefixLength", None)
    return flows


def _version_from_flags(value: str) -> int:
    match = re.search(r"NETFLOW v(\d+)", value)
    return int(match.group(1)) if match else 0


_STAT = re.compile(r"^([A-Za-z_ ]+):\s*(\d+)\s*$")


def parse_stat(text: str) -> dict[str, int]:
    """`nfdump -I` summary ("Flows: 65", "Sequence failures: 0") as a dict."""
    stats = {}
    for line in text.splitlines():
        match = _STAT.match(line)
        if match:
            stats[match.group(1).strip()] = int(match.group(2))
    return stats


class Nfcapd:
    """nfcapd listening on loopback (IPv4 or IPv6), writing to a private temp dir.

    start() -> send()/let an exporter send to .address -> stop() -> flows(), sequence_errors().
    """

    def __init__(self, ip_version: int = 4, workdir: Path | None = None, *,
                 port: int | None = None, socket_buffer: int | None = None):
        """port: bind there (one an exporter already sends to), default a free one;
        socket_buffer: the socket's receive buffer in bytes (-B), default the kernel's."""
        self.host = LOOPBACK[ip_version]
        self.port = port or free_udp_port(self.host)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fb-nfcapd-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.flowdir = self.workdir / "flows"
        self.flowdir.mkdir(parents=True, exist_ok=True)
        family = "-6" if ip_version == 6 else "-4"
        argv = ["nfcapd", family, "-b", self.host, "-p", str(self.port), "-w", str(self.flowdir)]
        if socket_buffer:
            argv += ["-B", str(socket_buffer)]
        self.daemon = Daemon(argv, self.workdir / "nfcapd.log")
        self.drops = 0
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> Nfcapd:
        self.daemon.start()
        wait_udp_bound(self.port)
        self.daemon.check_alive("nfcapd")
        return self

    def send(self, datagrams: Sequence[bytes]) -> int:
        return send_datagrams(datagrams, self.host, self.port)

    def stop(self) -> None:
        """Let nfcapd read everything queued, then SIGTERM: it flushes and closes its file."""
        if self._stopped:
            return
        self._stopped = True
        if self.daemon.running():
            # On timeout, stop anyway: the log and the flow count show what was lost.
            with contextlib.suppress(CollectorError):
                wait_udp_drained(self.port)
            self.drops = udp_drops(self.port)
        self.daemon.stop()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Nfcapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _files(self) -> list[Path]:
        files = sorted(p for p in self.flowdir.rglob("nfcapd.*") if "current" not in p.name)
        if not files:
            raise CollectorError(f"nfcapd wrote no file: {self.daemon.log()[-2000:]}")
        return files

    def flows(self) -> list[Flow]:
        text = "".join(run_tool(["nfdump", "-q", "-r", str(f), "-o", "raw"]) for f in self._files())
        return parse_raw(text)

    def stat(self) -> dict[str, int]:
        """Summed `nfdump -I` counters of every file written (Flows, Sequence failures, ...)."""
        total: dict[str, int] = {}
        for path in self._files():
            for key, value in parse_stat(run_tool(["nfdump", "-r", str(path), "-I"])).items():
                total[key] = total.get(key, 0) + value
        return total

    def sequence_errors(self) -> int:
        """`Sequence failures` from the files; cross-checked with nfcapd's own log line."""
        from_files = self.stat().get("Sequence failures", 0)
        logged = sum(int(n) for n in re.findall(r"Sequence Errors: (\d+)", self.daemon.log()))
        return max(from_files, logged)

    def bad_packets(self) -> int:
        return sum(int(n) for n in re.findall(r"Bad Packets: (\d+)", self.daemon.log()))

    def log(self) -> str:
        return self.daemon.log()


def decode_with_nfdump(datagrams: Sequence[bytes], ip_version: int = 4) -> tuple[list[Flow], int]:
    """One-shot: send the datagrams to a fresh nfcapd; return (flows, sequence errors)."""
    with Nfcapd(ip_version) as nfcapd:
        nfcapd.send(datagrams)
        nfcapd.stop()
        if nfcapd.drops:
            raise CollectorError(f"nfcapd socket dropped {nfcapd.drops} datagrams")
        return nfcapd.flows(), nfcapd.sequence_errors()
