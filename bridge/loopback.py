"""The built-in collector: with no collector configured the agent exports to this loopback socket,
decodes what arrives with ipfix.decoder and prints one readable line per flow, so a first run
shows flows within seconds and proves the whole export path, not a shortcut around it."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from datetime import datetime

from bridge.ratelimit import RateLimitedLog
from ipfix.decoder import Decoder
from ipfix.errors import DecodeError

log = logging.getLogger("flowbridge.loopback")

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
END_REASONS = {1: "idle", 2: "active", 3: "end", 4: "forced", 5: "evicted"}
TCP_FLAG_LETTERS = "FSRPAUEC"  # bit 0 = FIN ... bit 7 = CWR
# Far above what one agent tick exports; the rest waits in the socket buffer for the next drain.
MAX_DATAGRAMS_PER_DRAIN = 10_000


def _address(value: object) -> str:
    if isinstance(value, bytes | bytearray) and len(value) in (4, 16):
        return str(ipaddress.ip_address(bytes(value)))
    return str(value)


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _flags(bits: int) -> str:
    return "".join(c if bits >> i & 1 else "." for i, c in enumerate(TCP_FLAG_LETTERS))


def _int(record: dict, key: str, default: int = 0) -> int:
    """The value if it is an integer: anyone on the host can send this socket odd lengths."""
    value = record.get(key, default)
    return value if isinstance(value, int) else default


def _printable(text: str) -> str:
    """Control characters from the wire must not reach the terminal as escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _when(start_ms: int) -> str:
    try:
        return datetime.fromtimestamp(start_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):
        return "-"


def format_flow(record: dict) -> str:
    """One line: when, direction, protocol, endpoints, counts, flags, why it ended, process."""
    v6 = "sourceIPv6Address" in record
    src = _address(record.get("sourceIPv6Address" if v6 else "sourceIPv4Address", b""))
    dst = _address(record.get("destinationIPv6Address" if v6 else "destinationIPv4Address", b""))
    protocol = _int(record, "protocolIdentifier")
    start = _int(record, "flowStartMilliseconds")
    end = _int(record, "flowEndMilliseconds")
    when = _when(start) if start else "-"
    direction = {0: "in ", 1: "out"}.get(_int(record, "flowDirection", -1), "?  ")
    if protocol in (1, 58):
        type_code = _int(record, "destinationTransportPort")
        endpoints = f"{src} -> {dst} type {type_code >> 8} code {type_code & 0xFF}"
    else:
        endpoints = (
            f"{_endpoint(src, _int(record, 'sourceTransportPort'))} -> "
            f"{_endpoint(dst, _int(record, 'destinationTransportPort'))}"
        )
    parts = [
        when,
        direction,
        PROTOCOL_NAMES.get(protocol, str(protocol)),
        endpoints,
        f"{_int(record, 'packetDeltaCount')} pkts",
        f"{_int(record, 'octetDeltaCount')} B",
        f"{max(0, end - start)} ms",
    ]
    if protocol == 6:
        parts.append(_flags(_int(record, "tcpControlBits")))
    if "reversePacketDeltaCount" in record:
        parts.append(
            f"reverse {_int(record, 'reversePacketDeltaCount')} pkts "
            f"{_int(record, 'reverseOctetDeltaCount')} B"
        )
    reason = _int(record, "flowEndReason")
    if reason:
        parts.append(f"end={END_REASONS.get(reason, reason)}")
    for side in ("SRC", "DST"):
        name = record.get(f"{side}_PROC_NAME")
        if name:
            parts.append(f"proc={_printable(str(name))}[{_int(record, f'{side}_PROC_PID')}]")
    return "  ".join(parts)


class LoopbackCollector:
    """A UDP socket on 127.0.0.1 (an ephemeral port) that decodes and prints what arrives."""

    def __init__(self, printer: Callable[[str], None] = print) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)
        self.host, self.port = self.socket.getsockname()
        self._printer = printer
        self._decoder = Decoder()
        self._warnings = RateLimitedLog(log)
        self.flows_printed = 0
        self.rejected = 0

    def drain(self, max_datagrams: int = MAX_DATAGRAMS_PER_DRAIN) -> int:
        """Decodes and prints the datagrams waiting, at most `max_datagrams` of them, so a local
        flood cannot hold the agent's loop; returns how many flows it printed."""
        printed = 0
        for _ in range(max_datagrams):
            try:
                datagram, sender = self.socket.recvfrom(65535)
            except BlockingIOError:
                break
            try:
                messages = self._decoder.feed(datagram, sender[:2])
            except DecodeError as exc:
                self.rejected += 1
                self._warnings.warning(
                    exc.reason, f"built-in collector: undecodable datagram ({exc.reason}): {exc}"
                )
                continue
            for message in messages:
                for record in message.records:
                    self._printer(format_flow(record))
                    printed += 1
        self.flows_printed += printed
        return printed

    def close(self) -> None:
        self.drain()
        self.socket.close()
