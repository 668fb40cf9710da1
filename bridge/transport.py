"""Sending export messages to one collector over one long-lived UDP or TCP socket.

Collectors key template state on the exporter's address (some on its source port too), so each
collector gets exactly one socket for the life of the agent (UDP) or of the connection (TCP).
A collector that is down, unreachable or refusing is counted and retried, never fatal.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bridge.addresses import format_hostport, resolve
from bridge.config import CollectorConfig
from bridge.errors import UserError
from bridge.ratelimit import RateLimitedLog

log = logging.getLogger("flowbridge.transport")

# Large enough to absorb a burst of forced-end exports without EAGAIN, small enough to be harmless.
UDP_SNDBUF = 4 << 20
TCP_BACKLOG_BYTES = 8 << 20


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


class TcpTransport(Transport):
    """Non-blocking: the agent's loop never waits on a slow or absent collector. Messages queue in a
    bounded backlog (oldest dropped first, counted); on every (re)connect the `on_connect` hook's
    messages (the session's templates) go first, since a new connection starts with no templates."""

    kind = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        source: str | None = None,
        *,
        max_backlog_bytes: int = TCP_BACKLOG_BYTES,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(host, port, source)
        self.on_connect: Callable[[], list[bytes]] | None = None
        self.max_backlog_bytes = max_backlog_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff = backoff_initial
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._queue: deque[tuple[bytes, int]] = deque()  # (message, data records in it)
        self._queued_bytes = 0
        self._head_offset = 0  # bytes of the queue's head already written to this connection
        self._connected = False
        self._connect_started = 0.0
        self._next_attempt = 0.0
        if source:  # a bad source address is the operator's error: report it now, not in a retry
            self._new_socket(socket.SOCK_STREAM).close()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def backlog_messages(self) -> int:
        return len(self._queue)

    @property
    def backlog_bytes(self) -> int:
        return self._queued_bytes - self._head_offset

    def waiting(self) -> list[bytes]:
        """The queued messages, oldest first: on a new connection they follow `on_connect`'s."""
        return [message for message, _records in self._queue]

    def send(self, message: bytes, records: int = 0) -> bool:
        self._queue.append((message, records))
        self._queued_bytes += len(message)
        dropped_own = self._bound()
        self._pump()
        return not dropped_own

    def flush(self, timeout: float = 0.0) -> None:
        if self._connected:
            self._check_peer()
        self._pump(timeout)

    def _bound(self) -> bool:
        """Drops the oldest messages beyond the bound; returns whether the newest went too."""
        dropped = 0
        newest = self._queue[-1] if self._queue else None
        went_newest = False
        while self._queued_bytes > self.max_backlog_bytes and len(self._queue) > 1:
            # A partly written head must be finished, or the stream's framing breaks.
            index = 1 if self._head_offset else 0
            message, records = self._queue[index]
            del self._queue[index]
            self._queued_bytes -= len(message)
            self._drop(len(message), records)
            dropped += 1
            went_newest = went_newest or (message, records) is newest
        if dropped:
            self._log.warning(
                "backlog",
                f"collector {self.label}: backlog full ({self.max_backlog_bytes} bytes), "
                f"dropped {dropped} oldest message(s); {self.stats.messages_dropped} so far",
            )
        return went_newest

    def _pump(self, timeout: float = 0.0) -> None:
        """Connects when the backoff allows and writes what the socket takes. Waits (real time,
        whatever the backoff clock) up to `timeout` for the backlog to empty."""
        deadline = time.monotonic() + timeout
        while True:
            if self.socket is None and self._clock() >= self._next_attempt:
                self._start_connect()
            if self.socket is not None and not self._connected:
                self._check_connect(max(0.0, deadline - time.monotonic()))
            if self._connected:
                self._write()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._connected and not self._queue):
                return
            if self.socket is None:
                time.sleep(min(remaining, 0.05))
            elif self._connected:
                select.select([], [self.socket], [], min(remaining, 0.05))

    def _start_connect(self) -> None:
        try:
            sock = self._new_socket(socket.SOCK_STREAM)
        except (UserError, OSError) as exc:
            self._schedule_retry(str(exc))
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._connect_started = self._clock()
        code = sock.connect_ex(self.address)
        if code == 0:
            self._tcp_connected()
        elif code not in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            self._disconnect(OSError(code, os.strerror(code)))

    def _check_connect(self, wait: float) -> None:
        assert self.socket is not None
        _, writable, _ = select.select([], [self.socket], [], min(wait, 0.05))
        if writable:
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                self._tcp_connected()
            else:
                self._disconnect(OSError(code, os.strerror(code)))
        elif self._clock() - self._connect_started > self._connect_timeout:
            self._disconnect(OSError(errno.ETIMEDOUT, "connect timed out"))

    def _tcp_connected(self) -> None:
        """The TCP handshake is done; TLS starts its own handshake here."""
        self._established()

    def _established(self) -> None:
        self._connected = True
        self._backoff = self._backoff_initial
        self.stats.connects += 1
        self._head_offset = 0
        preamble = self.on_connect() if self.on_connect is not None else []
        for message in reversed(preamble):
            self._queue.appendleft((message, 0))
            self._queued_bytes += len(message)
        if not self._log.resolved("down", f"collector {self.label}: connected"):
            log.info("collector %s: connected", self.label)

    def _send_some(self, data: memoryview) -> int | None:
        """Bytes the socket took, None when it would block."""
        assert self.socket is not None
        try:
            return self.socket.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return None

    def _write(self) -> None:
        while self._queue:
            message, _records = self._queue[0]
            try:
                written = self._send_some(memoryview(message)[self._head_offset :])
            except OSError as exc:
                self._disconnect(exc)
                return
            if written is None:
                return
            self._head_offset += written
            if self._head_offset < len(message):
                return
            self._queue.popleft()
            self._queued_bytes -= len(message)
            self._head_offset = 0
            self.stats.messages_sent += 1
            self.stats.bytes_sent += len(message)

    def _check_peer(self) -> None:
        if self._peer_closed():
            self._disconnect(None)

    def _peer_closed(self) -> bool:
        """Collectors never talk back, so readable means EOF or a reset: reconnect now rather
        than lose the next message into a dead connection."""
        assert self.socket is not None
        readable, _, _ = select.select([self.socket], [], [], 0)
        if not readable:
            return False
        try:
            return self.socket.recv(4096, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _drop_connection(self) -> bool:
        """Closes the socket; returns whether the connection had been established."""
        if self.socket is not None:
            self.socket.close()
        self.socket = None
        was_connected = self._connected
        self._connected = False
        # A partly written message is resent whole on the next connection.
        self._head_offset = 0
        return was_connected

    def _disconnect(self, exc: OSError | None) -> None:
        was_connected = self._drop_connection()
        if isinstance(exc, ConnectionRefusedError) or (exc and exc.errno == errno.ECONNREFUSED):
            self.stats.refused += 1
        else:
            self.stats.send_errors += 1
        reason = "closed by the collector" if exc is None else (exc.strerror or str(exc))
        self._schedule_retry(reason if not was_connected else f"connection lost: {reason}")

    def _schedule_retry(self, reason: str) -> None:
        self._next_attempt = self._clock() + self._backoff
        self._log.warning(
            "down",
            f"collector {self.label}: {reason}; retrying in {self._backoff:g}s, "
            f"{len(self._queue)} message(s) waiting",
        )
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def close(self, drain_seconds: float = 0.0) -> None:
        """Tries for up to `drain_seconds` to send what is queued; the rest is counted dropped."""
        if drain_seconds > 0 and self._queue:
            self._next_attempt = min(self._next_attempt, self._clock())
            self._pump(drain_seconds)
        if self._queue:
            lost = len(self._queue)
            for message, records in self._queue:
                self._drop(len(message), records)
            log.warning("collector %s: %d message(s) never sent at shutdown", self.label, lost)
            self._queue.clear()
            self._queued_bytes = 0
        self._drop_connection()


def open_transport(
    kind: str, host: str, port: int, source: str | None = None, **tcp_options: object
) -> Transport:
    """One long-lived sender to host:port. `kind` is "udp", "tcp" or "tls" (which needs a
    `context`, see bridge.tls); an IPv6 host may be given with or without brackets. Bad addresses
    raise UserError."""
    if kind == "udp":
        return UdpTransport(host, port, source)
    if kind == "tcp":
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
