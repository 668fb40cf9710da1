"""Sending export messages to one collector over one long-lived UDP or TCP socket.

Collectors key template state on the exporter's address (some on its source port too), so each
collector gets exactly one socket for the life of the agent (UDP) or of the connection (TCP,
bridge/tcp_transport.py; TLS, bridge/tls.py). A collector that is down, unreachable or refusing
is counted and retried, never fatal.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from bridge.addresses import format_hostport, resolve
from bridge.config import CollectorConfig
from bridge.errors import UserError
from bridge.ratelimit import RateLimitedLog

log = logging.getLogger("flowbridge.transport")

# Large enough to absorb a burst of forced-end exports without EAGAIN, small enough to be harmless.
UDP_SNDBUF = 4 << 20


@dataclass(slots=True)
class TransportStats:
    messages_sent: int = 0
    bytes_sent: int = 0
    send_errors: int = 0  # failed sends other than refusals (unreachable, reset, ...)
    refused: int = 0  # ICMP port unreachable (UDP) or connection refused (TCP)
    messages_dropped: int = 0  # given up on: never sent, and counted here
    bytes_dropped: int = 0
    records_dropped: int = 0  # data records inside the dropped messages
    connects: int = 0  # TCP connections established (TLS: handshake done)
    # TCP: written into a connection that died before the collector's kernel acknowledged them,
    # so written again on the next connection.
    messages_resent: int = 0
    tls_failures: int = 0  # TLS handshakes failed or refused (verification, alerts)


class Transport:
    """Common part: address, counters, hooks. `send` returns whether the message was sent (UDP)
    or accepted for sending (TCP: written or queued)."""

    kind = ""

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        self.family, self.address = resolve(host, port, self.kind, source)
        self.source = source.strip("[]") if source else None
        self.label = f"{self.kind}://{format_hostport(self.address[0], port)}"
        self.stats = TransportStats()
        self.socket: socket.socket | None = None
        # Called with every new socket, e.g. so the eBPF source can ignore the agent's own traffic.
        self.on_socket: Callable[[socket.socket], None] | None = None
        self._log = RateLimitedLog(log)

    def _new_socket(self, socktype: int) -> socket.socket:
        sock = socket.socket(self.family, socktype)
        if self.source:
            try:
                sock.bind((self.source, 0))
            except OSError as exc:
                sock.close()
                raise UserError(
                    f"collector {self.label}: cannot use source address {self.source!r}: "
                    f"{exc.strerror}"
                ) from None
        if self.on_socket is not None:
            self.on_socket(sock)
        return sock

    def send(self, message: bytes, records: int = 0) -> bool:
        raise NotImplementedError

    def flush(self, timeout: float = 0.0) -> None:
        """Retry and drain what is pending. UDP has nothing pending."""

    @property
    def backlog_messages(self) -> int:
        return 0

    def close(self, drain_seconds: float = 0.0) -> None:
        raise NotImplementedError

    def _drop(self, message_bytes: int, records: int) -> None:
        self.stats.messages_dropped += 1
        self.stats.bytes_dropped += message_bytes
        self.stats.records_dropped += records


class UdpTransport(Transport):
    kind = "udp"

    def __init__(self, host: str, port: int, source: str | None = None) -> None:
        super().__init__(host, port, source)
        sock = self._new_socket(socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_SNDBUF)
            # Connected, so the kernel reports ICMP port unreachable as ECONNREFUSED.
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            raise UserError(f"collector {self.label}: {exc.strerror}") from None
        self.socket = sock
        self._send = sock.send

    def send(self, message: bytes, records: int = 0) -> bool:
        try:
            self._send(message)
        except ConnectionRefusedError:
            # The error belongs to an earlier datagram (the ICMP came back since); this one was
            # not sent yet, so one retry is right.
            self.stats.refused += 1
            self._log.warning(
                "refused",
                f"collector {self.label}: port unreachable (ICMP); is the collector running?",
            )
            try:
                self._send(message)
            except OSError as exc:
                return self._failed(exc, message, records)
        except OSError as exc:
            return self._failed(exc, message, records)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(message)
        return True

    def _failed(self, exc: OSError, message: bytes, records: int) -> bool:
        if isinstance(exc, ConnectionRefusedError):
            self.stats.refused += 1
        else:
            self.stats.send_errors += 1
        self._drop(len(message), records)
        self._log.warning(
            f"errno{exc.errno}", f"collector {self.label}: send failed: {exc.strerror or exc}"
        )
        return False

    def close(self, drain_seconds: float = 0.0) -> None:
        if self.socket is not None:
            self.socket.close()


def open_transport(
    kind: str, host: str, port: int, source: str | None = None, **tcp_options: object
) -> Transport:
    """One long-lived sender to host:port. `kind` is "udp", "tcp" or "tls" (which needs a
    `context`, see bridge.tls); an IPv6 host may be given with or without brackets. Bad addresses
    raise UserError."""
    if kind == "udp":
        return UdpTransport(host, port, source)
    if kind == "tcp":
        from bridge.tcp_transport import TcpTransport

        return TcpTransport(host, port, source, **tcp_options)  # type: ignore[arg-type]
    if kind == "tls":
        from bridge.tls import TlsTransport  # ssl is loaded only by agents that use it

        return TlsTransport(host, port, source, **tcp_options)  # type: ignore[arg-type]
    raise UserError(f"transport {kind!r}: expected 'udp', 'tcp' or 'tls'")


def open_collector_transport(config: CollectorConfig) -> Transport:
    """The transport a collector's configuration asks for, TLS settings included."""
    if config.transport == "tls":
        from bridge.tls import open_tls_transport

        return open_tls_transport(config)
    return open_transport(config.transport, config.host, config.port, config.source)
